//! Bytes between the coordinator and this rank: the shards it trains and evaluates on, the
//! checkpoint an attempt restores, and rank 0's uploads of checkpoints and models. Every
//! stream is checked against the totals it announces.

use anyhow::{anyhow, bail};
use trainer_core::EncodedSplit;
use trainer_proto::v1::{ArtifactChunk, ArtifactKind, CheckpointRequest, ShardRequest, Split};
use trainer_proto::ARTIFACT_CHUNK_BYTES;

use super::join::{status_error, Agent};
use super::shard::{append_chunk, check_totals};
use super::CheckpointAt;

impl Agent {
    pub(super) async fn fetch_shard(&self, split: Split, epoch: u64) -> anyhow::Result<EncodedSplit> {
        let what = format!("{} shard", split.as_str_name());
        let mut stream = self
            .client
            .clone()
            .fetch_shard(ShardRequest { worker: Some(self.identity.clone()), split: split as i32, epoch })
            .await
            .map_err(|s| status_error(&format!("cannot fetch the {what}"), s))?
            .into_inner();
        let mut out = EncodedSplit { offsets: vec![0], ..EncodedSplit::default() };
        let mut totals: Option<(u64, u64)> = None;
        while let Some(chunk) =
            stream.message().await.map_err(|s| status_error(&format!("the {what} stream broke"), s))?
        {
            if chunk.split != split as i32 || chunk.epoch != epoch {
                bail!("the {what} stream sent a chunk of another split or epoch");
            }
            let t = (chunk.total_reviews, chunk.total_tokens);
            if *totals.get_or_insert(t) != t {
                bail!("the {what} stream changed its announced totals");
            }
            append_chunk(&mut out, &chunk, self.job.vocab_size)
                .map_err(|e| anyhow!("malformed {what}: {e}"))?;
        }
        let (reviews, tokens) = totals.ok_or_else(|| anyhow!("the {what} stream was empty"))?;
        check_totals(&out, reviews, tokens).map_err(|e| anyhow!("{what}: {e}"))?;
        Ok(out)
    }

    /// The checkpoint this attempt resumes from, streamed from the coordinator.
    pub(super) async fn fetch_checkpoint(&self) -> anyhow::Result<Vec<u8>> {
        let mut stream = self
            .client
            .clone()
            .fetch_checkpoint(CheckpointRequest { worker: Some(self.identity.clone()) })
            .await
            .map_err(|s| status_error("cannot fetch the checkpoint to resume from", s))?
            .into_inner();
        let mut bytes = Vec::new();
        let mut total = None;
        while let Some(chunk) =
            stream.message().await.map_err(|s| status_error("the checkpoint stream broke", s))?
        {
            let t = *total.get_or_insert(chunk.total_bytes);
            if bytes.len() as u64 + chunk.data.len() as u64 > t {
                bail!("the checkpoint stream sent more than the {t} bytes it announced");
            }
            bytes.extend_from_slice(&chunk.data);
        }
        match total {
            Some(t) if t == bytes.len() as u64 => Ok(bytes),
            Some(t) => bail!("the checkpoint stream ended after {} of {t} bytes", bytes.len()),
            None => bail!("the checkpoint stream was empty"),
        }
    }

    pub(super) async fn upload(
        &self,
        kind: ArtifactKind,
        at: CheckpointAt,
        bytes: Vec<u8>,
    ) -> anyhow::Result<u64> {
        let epoch = at.epoch;
        let total = bytes.len() as u64;
        let identity = self.identity.clone();
        let mut chunks: Vec<ArtifactChunk> = bytes
            .chunks(ARTIFACT_CHUNK_BYTES)
            .map(|data| ArtifactChunk { data: data.to_vec(), ..ArtifactChunk::default() })
            .collect();
        if chunks.is_empty() {
            chunks.push(ArtifactChunk::default());
        }
        chunks[0].worker = Some(identity);
        chunks[0].kind = kind as i32;
        chunks[0].epoch = epoch;
        chunks[0].total_bytes = total;
        chunks[0].step_in_epoch = at.step_in_epoch;
        chunks[0].global_step = at.global_step;
        chunks[0].epoch_end = at.epoch_end;
        let reply = self
            .client
            .clone()
            .upload_artifact(tokio_stream::iter(chunks))
            .await
            .map_err(|s| status_error(&format!("cannot upload the {}", kind.as_str_name()), s))?
            .into_inner();
        if reply.bytes_written != total {
            bail!(
                "the coordinator stored {} of the {total} bytes of the {}",
                reply.bytes_written,
                kind.as_str_name()
            );
        }
        Ok(total)
    }
}
