//! TensorBoard event files, written without TensorFlow: a TFRecord file of `Event` protos.
//!
//! No maintained Rust crate writes them (tensorboard-rs pins an old protobuf), and the
//! format is small: each record is `u64 length (LE) | u32 masked CRC-32C of the length |
//! data | u32 masked CRC-32C of the data`, the first event carries `file_version
//! "brain.Event:2"`, and scalars are `Summary.Value.simple_value`. The messages below keep
//! only the fields we write, with TensorFlow's field numbers (tensorflow/core/util/event.proto,
//! framework/summary.proto, tensor.proto, tensor_shape.proto).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::{io_err, Result};

/// The folder under a run folder that holds the event files.
pub const TB_DIR: &str = "tb";

#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// tensorflow.DataType; DT_STRING is 7.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// A scalar shape: no dimensions.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {}

const DT_STRING: i32 = 7;

/// TFRecord's checksum: CRC-32C, rotated and offset so that a CRC of data holding CRCs
/// stays well distributed.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its checksum, the data, its checksum.
pub fn write_record(out: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    let len = (data.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc32c(&len).to_le_bytes())?;
    out.write_all(data)?;
    out.write_all(&masked_crc32c(data).to_le_bytes())
}

/// Reads the records of an event file back, checking both checksums of each (for tests and
/// tools; TensorBoard has its own reader).
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let bad = |message: &str| crate::VizError::Metrics {
        path: path.to_path_buf(),
        line: 0,
        message: message.into(),
    };
    let mut events = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes.get(at..at + 12).ok_or_else(|| bad("truncated record header"))?;
        let (len, len_crc) = head.split_at(8);
        if masked_crc32c(len) != u32::from_le_bytes([len_crc[0], len_crc[1], len_crc[2], len_crc[3]]) {
            return Err(bad("bad length checksum"));
        }
        let n = u64::from_le_bytes([len[0], len[1], len[2], len[3], len[4], len[5], len[6], len[7]]) as usize;
        let data = bytes.get(at + 12..at + 12 + n).ok_or_else(|| bad("truncated record"))?;
        let crc = bytes.get(at + 12 + n..at + 16 + n).ok_or_else(|| bad("truncated record checksum"))?;
        if masked_crc32c(data) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(bad("bad data checksum"));
        }
        events.push(Event::decode(data).map_err(|e| bad(&format!("not an Event: {e}")))?);
        at += 16 + n;
    }
    Ok(events)
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Appends events to a fresh `events.out.tfevents.*` file in a run's `tb/` folder. A
/// resumed run starts a new file beside the old ones; TensorBoard reads them all.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `<run_dir>/tb/events.out.tfevents.<secs>.<host>.<pid>.<suffix>`.
    pub fn create(run_dir: &Path, suffix: &str) -> Result<Self> {
        let dir = run_dir.join(TB_DIR);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let name = format!("events.out.tfevents.{}.{host}.{}.{suffix}", now() as u64, std::process::id());
        let path = dir.join(name);
        let file = File::create(&path).map_err(io_err(&path))?;
        let mut writer = Self { out: BufWriter::new(file), path };
        writer.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        write_record(&mut self.out, &event.encode_to_vec()).map_err(io_err(&self.path))
    }

    /// Scalars that share a step, in one event. Non-finite values are skipped (TensorBoard
    /// would draw them as gaps anyway, and NaN means "not measured" here).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let value: Vec<SummaryValue> = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue {
                tag: (*tag).to_string(),
                simple_value: Some(*v as f32),
                ..SummaryValue::default()
            })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    /// A text summary (the Text tab renders it as markdown).
    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        let value = SummaryValue {
            tag: tag.to_string(),
            simple_value: None,
            tensor: Some(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShapeProto {}),
                string_val: vec![text.as_bytes().to_vec()],
            }),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData { plugin_name: "text".into(), content: Vec::new() }),
            }),
        };
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value: vec![value] }),
        })
    }

    /// Pushes what was written to the file, so that a live TensorBoard sees it.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(io_err(&self.path))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC-32C("123456789") is 0xe3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn records_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), "test").unwrap();
        w.scalars(3, &[("train/loss", 0.5), ("train/lr", f64::NAN)]).unwrap();
        w.text(0, "config", "seed = 7").unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let values = &events[1].summary.as_ref().unwrap().value;
        assert_eq!((events[1].step, values.len()), (3, 1), "NaN is skipped");
        assert_eq!((values[0].tag.as_str(), values[0].simple_value), ("train/loss", Some(0.5)));
        let text = &events[2].summary.as_ref().unwrap().value[0];
        assert_eq!(text.tensor.as_ref().unwrap().string_val, vec![b"seed = 7".to_vec()]);
        // A flipped bit is caught.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(read_events(&path).is_err());
    }
}
