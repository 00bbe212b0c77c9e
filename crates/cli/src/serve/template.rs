//! Chat prompts: a Hugging Face `chat_template` (from `tokenizer_config.json`) run by
//! minijinja as written, or, for models without one (llama2.c's), a plain
//! concatenation: every message as `role: content` on its own line, then `assistant:`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

/// One message of a chat, as the template sees it.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
}

/// A special token in `tokenizer_config.json`: a string, or `{"content": …}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Reads the `chat_template` of a `tokenizer_config.json` (a string, or a list of
    /// `{name, template}` of which `default` is used). `Ok(None)` when it has none.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
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
                    None => bail!("{}: chat_template is a list without a `default` template", path.display()),
                }
            }
            Some(_) => bail!("{}: chat_template must be a string or a list of {{name, template}}", path.display()),
        };
        let bos = token_text(json.get("bos_token"));
        let eos = token_text(json.get("eos_token"));
        Ok(Some(ChatTemplate::new(source, bos, eos).with_context(|| format!("{}: chat_template", path.display()))?))
    }

    /// Compiles a template with the environment Hugging Face's `apply_chat_template`
    /// uses: blocks trimmed, Python's string methods, `raise_exception`.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source).map_err(|e| anyhow::anyhow!("does not compile: {e:#}"))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// The prompt text for `messages`, ending where the assistant's reply begins.
    pub fn render(&self, messages: &[Message]) -> std::result::Result<String, String> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| format!("the chat template failed: {e:#}"))
    }
}

/// The prompt of a model without a chat template (documented in the README).
pub fn plain(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&m.role);
        out.push_str(": ");
        out.push_str(&m.content);
        out.push('\n');
    }
    out.push_str("assistant:");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ChatML template in the style of Qwen2's, with a default system message,
    /// `raise_exception` and Python's `strip()`: rendered as Hugging Face would.
    #[test]
    fn chatml_template_renders_as_written() {
        let source = "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'].strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(source.into(), "".into(), "<|im_end|>".into()).unwrap();
        let msgs = [Message { role: "user".into(), content: "  Hi there ".into() }];
        assert_eq!(
            t.render(&msgs).unwrap(),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let bad = [Message { role: "robot".into(), content: "x".into() }];
        let e = t.render(&bad).unwrap_err();
        assert!(e.contains("bad role robot"), "{e}");
    }

    #[test]
    fn plain_concatenation() {
        let msgs = [
            Message { role: "system".into(), content: "Be brief.".into() },
            Message { role: "user".into(), content: "Hi".into() },
        ];
        assert_eq!(plain(&msgs), "system: Be brief.\nuser: Hi\nassistant:");
    }
}
