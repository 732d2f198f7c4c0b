//! The classifier's shape: everything that fixes its parameters' names and sizes, shared by
//! the worker (which builds the model) and the coordinator (which sizes its checkpoints
//! before the job starts).

use serde::{Deserialize, Serialize};

use crate::config::{Head, ModelConfig};

/// IMDB's classes, and the head of every model written before other corpora were read.
pub const NUM_CLASSES: i64 = 2;

fn two() -> usize {
    NUM_CLASSES as usize
}

/// Everything that fixes the parameters' shapes: a checkpoint or a model file only loads
/// into a model of the same shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub vocab_size: usize,
    pub embed_dim: usize,
    pub hidden: usize,
    pub layers: usize,
    pub head: Head,
    /// Files written before the option have no such field: unidirectional.
    #[serde(default)]
    pub bidirectional: bool,
    /// Outputs of the head, one per class; files written before the field: 2.
    #[serde(default = "two")]
    pub num_classes: usize,
}

impl ModelShape {
    pub fn new(config: &ModelConfig, vocab_size: usize) -> Self {
        Self {
            vocab_size,
            embed_dim: config.embed_dim,
            hidden: config.hidden,
            layers: config.layers,
            head: config.head,
            bidirectional: config.bidirectional,
            num_classes: config.num_classes,
        }
    }

    /// 2 for a bidirectional LSTM, else 1.
    pub fn directions(&self) -> usize {
        if self.bidirectional {
            2
        } else {
            1
        }
    }

    /// Width of the features that the linear layer reads.
    pub fn head_inputs(&self) -> usize {
        let per_direction = match self.head {
            Head::Last => self.hidden,
            Head::ConcatPool => 3 * self.hidden,
        };
        per_direction * self.directions()
    }

    /// (name, shape) of every parameter, in the canonical order: `nn.LSTM`'s, layer by
    /// layer, the reverse direction (`*_reverse`) after the forward one.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (v, e, h) = (self.vocab_size as i64, self.embed_dim as i64, self.hidden as i64);
        let mut out = vec![("embedding.weight".to_string(), vec![v, e])];
        let suffixes: &[&str] = if self.bidirectional { &["", "_reverse"] } else { &[""] };
        for layer in 0..self.layers {
            let input = if layer == 0 { e } else { h * self.directions() as i64 };
            for suffix in suffixes {
                out.push((format!("lstm.weight_ih_l{layer}{suffix}"), vec![4 * h, input]));
                out.push((format!("lstm.weight_hh_l{layer}{suffix}"), vec![4 * h, h]));
                out.push((format!("lstm.bias_ih_l{layer}{suffix}"), vec![4 * h]));
                out.push((format!("lstm.bias_hh_l{layer}{suffix}"), vec![4 * h]));
            }
        }
        let classes = self.num_classes as i64;
        out.push(("fc.weight".to_string(), vec![classes, self.head_inputs() as i64]));
        out.push(("fc.bias".to_string(), vec![classes]));
        out
    }

    pub fn num_parameters(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<i64>() as usize).sum()
    }

    /// Differences from `other`, for an error message; empty when equal.
    pub fn describe_difference(&self, other: &ModelShape) -> String {
        let mut diffs = Vec::new();
        if self.vocab_size != other.vocab_size {
            diffs.push(format!("vocab size {} vs {}", self.vocab_size, other.vocab_size));
        }
        if self.embed_dim != other.embed_dim {
            diffs.push(format!("embed_dim {} vs {}", self.embed_dim, other.embed_dim));
        }
        if self.hidden != other.hidden {
            diffs.push(format!("hidden {} vs {}", self.hidden, other.hidden));
        }
        if self.layers != other.layers {
            diffs.push(format!("layers {} vs {}", self.layers, other.layers));
        }
        if self.head != other.head {
            diffs.push(format!("head {:?} vs {:?}", self.head, other.head));
        }
        if self.num_classes != other.num_classes {
            diffs.push(format!("classes {} vs {}", self.num_classes, other.num_classes));
        }
        if self.bidirectional != other.bidirectional {
            diffs.push(format!("bidirectional {} vs {}", self.bidirectional, other.bidirectional));
        }
        diffs.join(", ")
    }
}

impl ModelShape {
    /// Bytes of a safetensors file holding `copies` f32 copies of every parameter (the
    /// model is 1; a checkpoint with Adam's two moments and the best model's copy is 4),
    /// with a generous allowance for the header.
    pub fn safetensors_bytes(&self, copies: usize) -> u64 {
        let header = 64 * 1024 + 512 * self.parameter_shapes().len() as u64 * copies as u64;
        4 * self.num_parameters() as u64 * copies as u64 + header
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tutorial_model_has_its_known_parameter_count() {
        // Embedding(100,684 x 128), LSTM(128 -> 256, 2 layers), Linear(256 -> 2): the
        // tutorial's model on the full vocabulary.
        let config = ModelConfig { embed_dim: 128, hidden: 256, layers: 2, ..ModelConfig::default() };
        let shape = ModelShape::new(&config, 100_684);
        let lstm = 4 * 256 * (128 + 256) + 8 * 256 + 4 * 256 * (256 + 256) + 8 * 256;
        assert_eq!(shape.num_parameters(), 100_684 * 128 + lstm + 2 * 256 + 2);
        assert!(shape.safetensors_bytes(4) > 4 * 4 * shape.num_parameters() as u64);
    }
}
