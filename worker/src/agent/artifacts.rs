//! Bytes between the coordinator and this rank: the shards it trains and evaluates on, the
//! checkpoint an attempt restores, and rank 0's uploads of checkpoints and models. Every
//! stream is checked against the totals it announces.

use anyhow::{anyhow, bail};
use trainer_core::integrity::FileDigest;
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
            append_chunk(&mut out, &chunk, self.job.vocab_size, self.job.config.model.num_classes)
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
        let mut sha256 = String::new();
        while let Some(chunk) =
            stream.message().await.map_err(|s| status_error("the checkpoint stream broke", s))?
        {
            let t = *total.get_or_insert_with(|| {
                sha256 = chunk.sha256.clone();
                chunk.total_bytes
            });
            if bytes.len() as u64 + chunk.data.len() as u64 > t {
                bail!("the checkpoint stream sent more than the {t} bytes it announced");
            }
            bytes.extend_from_slice(&chunk.data);
        }
        match total {
            Some(t) if t == bytes.len() as u64 => {}
            Some(t) => bail!("the checkpoint stream ended after {} of {t} bytes", bytes.len()),
            None => bail!("the checkpoint stream was empty"),
        }
        // Checked before any byte is used: what arrived is what the coordinator verified.
        if sha256.is_empty() {
            bail!("the checkpoint stream carried no sha256 (a coordinator of another release?)");
        }
        FileDigest { bytes: bytes.len() as u64, sha256 }
            .check_bytes(&bytes)
            .map_err(|e| anyhow!("the checkpoint to resume from arrived damaged: {e}"))?;
        Ok(bytes)
    }

    /// Uploads an artifact (rank 0); `Ok(Err(message))` when the coordinator's storage
    /// refused it (a full disk: the coordinator decides, this rank trains on).
    pub(super) async fn upload(
        &self,
        kind: ArtifactKind,
        at: CheckpointAt,
        bytes: Vec<u8>,
    ) -> anyhow::Result<Result<u64, String>> {
        let epoch = at.epoch;
        let total = bytes.len() as u64;
        let sha256 = FileDigest::of_bytes(&bytes).sha256;
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
        chunks[0].sha256 = sha256;
        let reply = match self.client.clone().upload_artifact(tokio_stream::iter(chunks)).await {
            Ok(reply) => reply.into_inner(),
            Err(s)
                if s.code() == tonic::Code::ResourceExhausted
                    && s.message().starts_with(trainer_proto::STORAGE_FAILURE_PREFIX) =>
            {
                tracing::warn!(
                    kind = kind.as_str_name(),
                    "the coordinator could not store it: {}",
                    s.message()
                );
                return Ok(Err(s.message().to_string()));
            }
            Err(s) => return Err(status_error(&format!("cannot upload the {}", kind.as_str_name()), s)),
        };
        if reply.bytes_written != total {
            bail!(
                "the coordinator stored {} of the {total} bytes of the {}",
                reply.bytes_written,
                kind.as_str_name()
            );
        }
        Ok(Ok(total))
    }
}
