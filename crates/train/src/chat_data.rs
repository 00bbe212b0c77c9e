//! Chat (instruction) fine-tuning data: JSONL conversations rendered with the model's
//! chat template, tokenized, and written as masked shards ([`crate::data`]) whose loss
//! mask is 1 exactly on the assistant's tokens.
//!
//! **Input.** One conversation per line: `{"messages": [{"role": "…", "content": "…"},
//! …]}` (other fields are ignored; blank lines are skipped). Errors name the file, the
//! line and the field (`data.jsonl:3: messages[1].content: …`).
//!
//! **Rendering.** With a Hugging Face `chat_template` ([`llama::chat::ChatTemplate`]),
//! the whole conversation is rendered with `add_generation_prompt = false` and tokenized
//! as is, without adding BOS (the template writes what the model expects, as
//! `apply_chat_template` does). Without a template (llama2.c models) it is the plain
//! format `anetrain serve` prompts with: BOS, then every message as `role: content\n`,
//! then EOS when the last message is the assistant's (so the model learns to stop).
//!
//! **The assistant's text**, as byte ranges of the rendered conversation:
//! 1. a template with `{% generation %}` … `{% endgeneration %}` tags: what the tags
//!    enclose (exactly what `apply_chat_template(…, return_assistant_tokens_mask=True)`
//!    marks);
//! 2. otherwise, for every assistant message `i`: the text that rendering messages
//!    `0..=i` (without a generation prompt) adds to rendering messages `0..i` *with*
//!    the generation prompt — the reply and the end-of-turn text after it (ChatML's
//!    `content<|im_end|>\n`). Both renderings must be prefixes of the whole
//!    conversation's; a template that renders earlier turns differently (Qwen3 drops
//!    past reasoning) is refused with a message suggesting generation tags;
//! 3. the plain format: rule 2 on its text (` content\n` after `assistant:`), plus the
//!    final EOS.
//!
//! **Tokens.** A token is an assistant token when it holds part of an assistant range:
//! the tokens of `text[..start]` and `text[..end]` are compared with the whole text's,
//! and the range runs from the first token where the prefix before `start` stops
//! agreeing to the last token where the prefix up to `end` does (a token that straddles
//! a boundary counts as assistant, as `char_to_token` makes it in transformers). This
//! needs no token offsets, so every tokenizer kind works.

use std::io::BufRead;
use std::ops::Range;
use std::path::{Path, PathBuf};

use llama::chat::{ChatTemplate, Message};
use llama::tokenizers::AnyTokenizer;
use rayon::prelude::*;

use crate::data::{self, DataError, TokenWidth};

/// How conversations become text.
pub enum ChatFormat {
    /// A Hugging Face chat template.
    Template(Box<ChatTemplate>),
    /// No template: `role: content` lines (see the module docs).
    Plain,
}

/// What can go wrong making chat data, naming the file (and line).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatDataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {message}", path.display())]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{}: no conversations (every line was blank)", path.display())]
    NoConversations { path: PathBuf },
    #[error("two inputs would both write {}: give inputs distinct file names", path.display())]
    SameOutput { path: PathBuf },
    #[error("no input files were given")]
    NoInputs,
    #[error(transparent)]
    Data(#[from] DataError),
}

/// One conversation, tokenized, with its loss mask (1 on the assistant's tokens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub tokens: Vec<u32>,
    pub mask: Vec<u8>,
}

/// What one input produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatSummary {
    pub input: PathBuf,
    pub output: PathBuf,
    pub conversations: usize,
    pub tokens: usize,
    /// Tokens whose mask is 1 (the assistant's).
    pub loss_tokens: usize,
}

/// Parses one JSONL line; `Err` is the message (field first).
pub fn parse_line(line: &str) -> Result<Vec<Message>, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let messages = value
        .get("messages")
        .ok_or("no \"messages\" field (each line must be {\"messages\": [{\"role\": …, \"content\": …}, …]})")?;
    let list = messages.as_array().ok_or("messages: expected an array of {\"role\", \"content\"} objects")?;
    if list.is_empty() {
        return Err("messages: the conversation is empty".into());
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |name: &str| match m.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("messages[{i}].{name}: expected a string, found {other}")),
                None => Err(format!("messages[{i}].{name}: missing")),
            };
            Ok(Message { role: field("role")?, content: field("content")? })
        })
        .collect()
}

/// The conversations of a JSONL file, with their line numbers (1-based).
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Vec<Message>)>, ChatDataError> {
    let io_error = |source| ChatDataError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_error)?;
        if line.trim().is_empty() {
            continue;
        }
        let messages =
            parse_line(&line).map_err(|message| ChatDataError::Line { path: path.into(), line: i + 1, message })?;
        out.push((i + 1, messages));
    }
    if out.is_empty() {
        return Err(ChatDataError::NoConversations { path: path.into() });
    }
    Ok(out)
}

/// The rendered conversation and the byte ranges of the assistant's text in it (see
/// the module docs for the rules).
pub fn render(format: &ChatFormat, messages: &[Message]) -> Result<(String, Vec<Range<usize>>), String> {
    let render_prefix = |messages: &[Message], generation_prompt: bool| match format {
        ChatFormat::Template(t) => t.render_marked(messages, generation_prompt).map(|r| r.text),
        ChatFormat::Plain => {
            let mut text = llama::chat::plain_conversation(messages);
            if generation_prompt {
                text.push_str("assistant:");
            }
            Ok(text)
        }
    };
    let text = match format {
        ChatFormat::Template(t) if t.has_generation_markers() => {
            let rendered = t.render_marked(messages, false)?;
            return Ok((rendered.text, rendered.spans));
        }
        _ => render_prefix(messages, false)?,
    };
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
        let before = render_prefix(&messages[..i], true)?;
        let through = render_prefix(&messages[..=i], false)?;
        if !through.starts_with(&before) || !text.starts_with(&through) {
            return Err(format!(
                "messages[{i}] (assistant): the chat template renders the conversation up to this reply \
                 differently from the whole conversation, so the reply's tokens cannot be found; add \
                 {{% generation %}} … {{% endgeneration %}} tags around the assistant's text in the template"
            ));
        }
        if through.len() > before.len() {
            spans.push(before.len()..through.len());
        } else if !m.content.is_empty() {
            return Err(format!("messages[{i}] (assistant): the chat template does not render its content"));
        }
    }
    Ok((text, spans))
}

/// Length of the common prefix of two token lists.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokenizes a conversation and marks the assistant's tokens (see the module docs).
pub fn encode(tokenizer: &AnyTokenizer, format: &ChatFormat, messages: &[Message]) -> Result<Encoded, String> {
    let (text, spans) = render(format, messages)?;
    let plain = matches!(format, ChatFormat::Plain);
    let encode = |s: &str| tokenizer.encode(s, plain).map_err(|e| format!("cannot tokenize: {e}"));
    let mut tokens = encode(&text)?;
    let mut mask = vec![0u8; tokens.len()];
    for span in &spans {
        let start = common_prefix(&encode(&text[..span.start])?, &tokens);
        let upto = encode(&text[..span.end])?;
        let agree = common_prefix(&upto, &tokens);
        // Where the prefix up to `end` stops agreeing, the whole text's token there
        // straddles `end`: it holds assistant text too.
        let end = if agree < upto.len() { (agree + 1).min(tokens.len()) } else { agree };
        mask[start.min(end)..end].fill(1);
    }
    if plain && messages.last().is_some_and(|m| m.role == "assistant") {
        if let Some(&eos) = tokenizer.eos_ids().first() {
            tokens.push(eos);
            mask.push(1);
        }
    }
    Ok(Encoded { tokens, mask })
}

/// Encodes every conversation of every input into `out_dir/<stem>.bin`, masked shards
/// of `width` tokens (created if needed). Conversations are encoded in parallel and
/// written in input order.
pub fn chat_files(
    tokenizer: &AnyTokenizer,
    format: &ChatFormat,
    inputs: &[PathBuf],
    out_dir: &Path,
    width: TokenWidth,
) -> Result<Vec<ChatSummary>, ChatDataError> {
    if inputs.is_empty() {
        return Err(ChatDataError::NoInputs);
    }
    let outputs: Vec<PathBuf> = inputs
        .iter()
        .map(|input| {
            let stem = input.file_stem().map_or_else(|| "chat".into(), |s| s.to_string_lossy().into_owned());
            out_dir.join(format!("{stem}.bin"))
        })
        .collect();
    for (i, output) in outputs.iter().enumerate() {
        if outputs[..i].contains(output) {
            return Err(ChatDataError::SameOutput { path: output.clone() });
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|source| ChatDataError::Io { path: out_dir.into(), source })?;
    let mut summaries = Vec::with_capacity(inputs.len());
    for (input, output) in inputs.iter().zip(outputs) {
        let conversations = read_jsonl(input)?;
        let encoded: Vec<Encoded> = conversations
            .par_iter()
            .map(|(line, messages)| {
                encode(tokenizer, format, messages).map_err(|message| ChatDataError::Line {
                    path: input.clone(),
                    line: *line,
                    message,
                })
            })
            .collect::<Result<_, _>>()?;
        let tokens: Vec<u32> = encoded.iter().flat_map(|e| e.tokens.iter().copied()).collect();
        let mask: Vec<u8> = encoded.iter().flat_map(|e| e.mask.iter().copied()).collect();
        data::write_tokens(&output, &tokens, width, Some(&mask))?;
        summaries.push(ChatSummary {
            input: input.clone(),
            output,
            conversations: conversations.len(),
            tokens: tokens.len(),
            loss_tokens: mask.iter().filter(|&&m| m == 1).count(),
        });
    }
    Ok(summaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_name_the_field() {
        assert!(parse_line("{").unwrap_err().starts_with("not JSON"));
        assert!(parse_line("{}").unwrap_err().contains("no \"messages\""));
        assert!(parse_line(r#"{"messages": []}"#).unwrap_err().contains("empty"));
        let e = parse_line(r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}"#).unwrap_err();
        assert_eq!(e, "messages[1].content: missing");
        let e = parse_line(r#"{"messages": [{"role": 3, "content": "a"}]}"#).unwrap_err();
        assert_eq!(e, "messages[0].role: expected a string, found 3");
    }

    #[test]
    fn plain_rule_marks_the_reply_after_assistant_colon() {
        let msgs = [Message::new("user", "Hi"), Message::new("assistant", "Hello"), Message::new("user", "Bye")];
        let (text, spans) = render(&ChatFormat::Plain, &msgs).unwrap();
        assert_eq!(text, "user: Hi\nassistant: Hello\nuser: Bye\n");
        assert_eq!(spans.iter().map(|s| &text[s.clone()]).collect::<Vec<_>>(), [" Hello\n"]);
    }
}
