//! # llama — Llama-family models, independent of any device
//!
//! Everything anetrain knows about the *model*, and nothing about where it runs:
//!
//! - [`config`]: the model's shape ([`Config`]), presets from `tiny` to `stories110m`,
//!   validation with errors that name the field;
//! - [`params`]: fp32 parameters in one contiguous array with named views ([`Params`],
//!   [`Layout`]), and llama2.c's initialization;
//! - [`llama2c`]: llama2.c's `model.bin` (v0 and v1), read and write;
//! - [`tokenizer`]: `tokenizer.bin` and llama2.c's BPE encode/decode ([`Tokenizer`]);
//! - [`sampler`]: greedy, temperature and top-p sampling with llama2.c's RNG ([`Sampler`]);
//! - [`reference`](mod@reference): a plain fp32 forward pass, the yardstick for the device pipelines;
//! - [`generate`](generate::generate): llama2.c's generation loop over any forward pass;
//! - [`hf`]: Hugging Face folders (config.json + safetensors, Llama and Qwen2), with the
//!   RoPE permutation between llama2.c's and Hugging Face's conventions;
//! - [`tokenizers`](mod@tokenizers): llama2.c, SentencePiece and Hugging Face tokenizers behind one type;
//! - [`chat`]: chat templates (`tokenizer_config.json`'s, run by minijinja) and the plain
//!   `role: content` format of models without one.
//!
//! The `train` crate builds MIL kernels and training on top of these types; the `cli`
//! crate wires them to files and flags.
//!
//! ```no_run
//! use llama::{llama2c, reference, Sampler, Tokenizer};
//!
//! # fn main() -> Result<(), llama::Error> {
//! let params = llama2c::read_model("stories260K.bin")?;
//! let tokenizer = Tokenizer::read("tok512.bin")?;
//! tokenizer.check_vocab(params.config().vocab_size)?;
//! let mut cache = reference::KvCache::new(params.config());
//! let mut text = Vec::new();
//! llama::generate::generate(
//!     &tokenizer,
//!     &mut Sampler::greedy(),
//!     "Once upon a time",
//!     params.config().seq_len,
//!     |token, pos| reference::forward(&params, &mut cache, token, pos),
//!     |piece| text.extend_from_slice(piece),
//! )?;
//! println!("{}", String::from_utf8_lossy(&text));
//! # Ok(())
//! # }
//! ```
//!
//! A runnable round trip through the parts:
//!
//! ```
//! use llama::{llama2c, reference, Config, Params};
//!
//! let config = Config::preset("tiny").unwrap();
//! let params = Params::init(&config, 42).unwrap();
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("model.bin");
//! llama2c::write_model(&params, &path, llama2c::Version::V1).unwrap();
//! let loaded = llama2c::read_model(&path).unwrap();
//! assert_eq!(loaded, params);
//! let logits = reference::forward_sequence(&loaded, &[1, 40, 41]).unwrap();
//! assert_eq!((logits.len(), logits[0].len()), (3, 512));
//! ```

pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod hf;
pub mod llama2c;
pub mod params;
pub mod reference;
pub mod sampler;
pub mod tokenizer;
pub mod tokenizers;

pub use config::{Config, RopeScaling};
pub use error::{Error, ErrorKind, Result};
pub use params::{Layer, LayerMut, Layout, Params, TensorKind, TensorSpec};
pub use sampler::Sampler;
pub use tokenizer::Tokenizer;
