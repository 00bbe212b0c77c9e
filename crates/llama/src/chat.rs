//! Chat templates: a Hugging Face `chat_template` (from `tokenizer_config.json`) run by
//! minijinja as written, or, for models without one (llama2.c's), a plain
//! concatenation: every message as `role: content` on its own line, then `assistant:`.
//!
//! Used by `anetrain serve` to build prompts and by chat fine-tuning data
//! (`train::chat_data`) to render whole conversations and find the assistant's part.
//! Templates may mark the assistant's text with Hugging Face's `{% generation %}` …
//! `{% endgeneration %}` tags (what `apply_chat_template(…,
//! return_assistant_tokens_mask=True)` reads); [`ChatTemplate::render_marked`] returns
//! those spans, and every other rendering leaves the tags out.
//!
//! ```
//! use llama::chat::{ChatTemplate, Message};
//! let source = "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}</s>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
//! let t = ChatTemplate::new(source.into(), "".into(), "</s>".into()).unwrap();
//! let msgs = [Message::new("user", "Hi"), Message::new("assistant", "Hello")];
//! let r = t.render_marked(&msgs, false).unwrap();
//! assert_eq!(r.text, "<user>Hi<assistant>Hello</s>");
//! assert_eq!(&r.text[r.spans[0].clone()], "Hello</s>");
//! ```

use std::ops::Range;
use std::path::Path;

use minijinja::{context, Environment, ErrorKind as JinjaErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{err, Error, Result};

/// One message of a chat, as the template sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

/// Private-use characters the `{% generation %}` tags are rewritten to print, so the
/// rendered text shows where they were (and they are then removed).
const GENERATION_START: char = '\u{F0000}';
const GENERATION_END: char = '\u{F0001}';

pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
    /// Whether the template marks the assistant's text with `{% generation %}`.
    generation_markers: bool,
}

/// A rendered chat and the byte ranges of its `{% generation %}` blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub spans: Vec<Range<usize>>,
}

/// A special token in `tokenizer_config.json`: a string, or `{"content": …}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (with any `-` whitespace control)
/// into blocks that print the marker characters, keeping the tags' whitespace handling
/// (trim_blocks and lstrip_blocks apply to the replacement blocks as to the tags).
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(close) = tag.find("%}") else { break };
        let inner = &tag[2..close];
        let left = if inner.starts_with('-') {
            "-"
        } else if inner.starts_with('+') {
            "+"
        } else {
            ""
        };
        let right = if inner.ends_with('-') {
            "-"
        } else if inner.ends_with('+') {
            "+"
        } else {
            ""
        };
        let word = inner.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim();
        let marker = match word {
            "generation" => Some(GENERATION_START),
            "endgeneration" => Some(GENERATION_END),
            _ => None,
        };
        match marker {
            Some(marker) => {
                found = true;
                out.push_str(&format!("{{%{left} if true %}}{marker}{{% endif {right}%}}"));
            }
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    (out, found)
}

impl ChatTemplate {
    /// Reads the `chat_template` of a `tokenizer_config.json` (a string, or a list of
    /// `{name, template}` of which `default` is used). `Ok(None)` when it has none.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read", e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err!(Format, "is not JSON: {e}").in_file(path))?;
        let source = match json.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => {
                let named = |name: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                        .and_then(|t| t.get("template"))
                };
                match named("default").and_then(|t| t.as_str()) {
                    Some(s) => s.to_string(),
                    None => {
                        return Err(err!(Format, "chat_template is a list without a `default` template").in_file(path))
                    }
                }
            }
            Some(_) => {
                return Err(err!(Format, "chat_template must be a string or a list of {{name, template}}").in_file(path))
            }
        };
        let bos = token_text(json.get("bos_token"));
        let eos = token_text(json.get("eos_token"));
        let template = ChatTemplate::new(source, bos, eos)
            .map_err(|e| Error { message: format!("chat_template {}", e.message), ..e }.in_file(path))?;
        Ok(Some(template))
    }

    /// Compiles a template with the environment Hugging Face's `apply_chat_template`
    /// uses: blocks trimmed, Python's string methods, `raise_exception`, and the
    /// `{% generation %}` tags.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(JinjaErrorKind::InvalidOperation, message))
        });
        let (source, generation_markers) = rewrite_generation_tags(&source);
        env.add_template_owned("chat", source).map_err(|e| err!(Format, "does not compile: {e:#}"))?;
        Ok(ChatTemplate { env, bos_token, eos_token, generation_markers })
    }

    /// True when the template marks the assistant's text with `{% generation %}` tags.
    pub fn has_generation_markers(&self) -> bool {
        self.generation_markers
    }

    /// The prompt text for `messages`, ending where the assistant's reply begins.
    pub fn render(&self, messages: &[Message]) -> std::result::Result<String, String> {
        Ok(self.render_marked(messages, true)?.text)
    }

    /// `messages` rendered (with `add_generation_prompt` as given), and the byte ranges
    /// of the text the template's `{% generation %}` blocks printed (none without them).
    pub fn render_marked(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> std::result::Result<Rendered, String> {
        let markers = [GENERATION_START, GENERATION_END];
        if messages.iter().any(|m| m.content.contains(markers) || m.role.contains(markers)) {
            return Err(format!(
                "a message holds U+{:X} or U+{:X}, reserved here",
                GENERATION_START as u32, GENERATION_END as u32
            ));
        }
        let template = self.env.get_template("chat").expect("added in new");
        let raw = template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| format!("the chat template failed: {e:#}"))?;
        let mut text = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut open: Option<usize> = None;
        for c in raw.chars() {
            match c {
                GENERATION_START => open = open.or(Some(text.len())),
                GENERATION_END => {
                    if let Some(start) = open.take() {
                        if start < text.len() {
                            spans.push(start..text.len());
                        }
                    }
                }
                c => text.push(c),
            }
        }
        if let Some(start) = open.filter(|&s| s < text.len()) {
            spans.push(start..text.len());
        }
        Ok(Rendered { text, spans })
    }
}

/// The prompt of a model without a chat template (documented in the README).
pub fn plain(messages: &[Message]) -> String {
    let mut out = plain_conversation(messages);
    out.push_str("assistant:");
    out
}

/// A whole conversation without a chat template: every message as `role: content` on
/// its own line. (A reply to [`plain`]'s prompt continues it with ` content\n`.)
pub fn plain_conversation(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&m.role);
        out.push_str(": ");
        out.push_str(&m.content);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        let source = "A\n{%- generation -%}\n  B\n{%- endgeneration %}\nC";
        let t = ChatTemplate::new(source.into(), String::new(), String::new()).unwrap();
        assert!(t.has_generation_markers());
        let r = t.render_marked(&[], false).unwrap();
        // Without the tags, the same trims: `A` + `B` + (trim_blocks eats the newline) `C`.
        assert_eq!(r.text, "ABC");
        assert_eq!(&r.text[r.spans[0].clone()], "B");
        let bad = [Message::new("user", "\u{F0000}")];
        assert!(t.render_marked(&bad, false).unwrap_err().contains("reserved"));
    }
}
