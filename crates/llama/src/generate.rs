//! The text-generation loop of llama2.c `run.c` `generate()`, over any forward pass.
//!
//! The loop encodes the prompt with BOS, feeds the prompt tokens one position at a time
//! (ignoring the model's predictions until the prompt is consumed), then samples; it
//! stops after `steps` positions or when the model produces BOS. Each new token is
//! decoded against its predecessor and handed to `emit` after run.c's `safe_printf`
//! filter. run.c then prints a final `"\n"`; callers that want its exact output add it.

use crate::error::Result;
use crate::sampler::Sampler;
use crate::tokenizer::{printable, Tokenizer, BOS};

/// Runs the generation loop. `forward(token, pos)` returns the logits for `token` at
/// `pos` (e.g. [`reference::forward`](crate::reference::forward) over a cache, or a
/// device pipeline). `steps` counts positions, prompt included, as run.c's `-n` does;
/// clamp it to the model's `seq_len` first (run.c uses `seq_len` when `-n` is 0 or
/// larger). Returns the token sequence: BOS, the prompt, then what was generated (a
/// final BOS that stopped the loop is not included).
///
/// ```
/// use llama::{generate::generate, reference, Config, Params, Sampler, Tokenizer};
///
/// let config = Config { vocab_size: 8, ..Config::preset("tiny").unwrap() };
/// let params = Params::init(&config, 1).unwrap();
/// let pieces = ["<unk>", "<s>", "</s>", " ", "a", "b", " a", "ab"].map(String::from).to_vec();
/// let tokenizer = Tokenizer::new(pieces, vec![0.0; 8]).unwrap();
/// let mut cache = reference::KvCache::new(&config);
/// let mut text = Vec::new();
/// let tokens = generate(
///     &tokenizer,
///     &mut Sampler::greedy(),
///     "a",
///     10,
///     |token, pos| reference::forward(&params, &mut cache, token, pos),
///     |piece| text.extend_from_slice(piece),
/// )
/// .unwrap();
/// assert_eq!(&tokens[..2], &[1, 6]); // BOS, " a"
/// assert!(tokens.len() <= 11);
/// ```
pub fn generate(
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    prompt: &str,
    steps: usize,
    mut forward: impl FnMut(u32, usize) -> Result<Vec<f32>>,
    mut emit: impl FnMut(&[u8]),
) -> Result<Vec<u32>> {
    let prompt_tokens = tokenizer.encode(prompt, true, false);
    let mut tokens = vec![prompt_tokens[0]];
    let mut token = prompt_tokens[0];
    for pos in 0..steps {
        let logits = forward(token, pos)?;
        let next = match prompt_tokens.get(pos + 1) {
            Some(&forced) => forced,
            None => sampler.sample(&logits),
        };
        if next == BOS {
            break;
        }
        emit(printable(tokenizer.decode(token, next)));
        tokens.push(next);
        token = next;
    }
    Ok(tokens)
}
