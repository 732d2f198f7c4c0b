//! safetensors files of f32 tensors, as checkpoints and exported models are written and
//! read: serialising (with one metadata key, so that the header's bytes are reproducible),
//! writing atomically, reading with errors that name the file, and the tensor data section
//! that a checkpoint's header hashes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, WorkerError};

pub(crate) struct RawF32 {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &RawF32 {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

pub(crate) fn to_raw(t: &Tensor) -> Result<RawF32> {
    let t = t.f_detach()?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let values = Vec::<f32>::try_from(&t.f_reshape([-1i64])?)?;
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(RawF32 { shape, bytes })
}

pub(crate) fn raw_tensors(tensors: &[(String, &Tensor)]) -> Result<Vec<(String, RawF32)>> {
    tensors.iter().map(|(n, t)| Ok((n.clone(), to_raw(t)?))).collect()
}

pub(crate) fn serialize(
    raws: &[(String, RawF32)],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>> {
    safetensors::tensor::serialize(raws.iter().map(|(n, r)| (n.clone(), r)), Some(metadata))
        .map_err(|e| WorkerError::Invalid(format!("{}: cannot serialise: {e}", path.display())))
}

pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[(String, &Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes = serialize(&raw_tensors(tensors)?, metadata, path)?;
    trainer_core::write_atomically(path, &bytes)?;
    Ok(())
}

/// The tensor data of safetensors `bytes`: everything after the 8-byte length and the header.
pub(crate) fn data_section(bytes: &[u8]) -> Option<&[u8]> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    bytes.get(8usize.checked_add(usize::try_from(n).ok()?)?..)
}

/// The bytes of a checkpoint or model file; `what` names it in errors.
pub(crate) fn read_bytes(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| WorkerError::Checkpoint {
        path: path.to_path_buf(),
        message: if e.kind() == std::io::ErrorKind::NotFound {
            format!("no {what} here (file not found)")
        } else {
            format!("cannot read: {e}")
        },
    })
}

/// The tensors and metadata of safetensors `bytes`; `source` names them in errors.
pub(crate) fn parse_safetensors(
    bytes: &[u8],
    source: &Path,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bad = |message: String| WorkerError::Checkpoint { path: source.to_path_buf(), message };
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!("tensor {name} is {:?}; expected F32", view.dtype())));
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, Kind::Float)?;
        tensors.insert(name, t);
    }
    Ok((tensors, metadata))
}
