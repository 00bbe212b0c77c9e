//! Chat prompts: the rendering lives in [`llama::chat`] (shared with chat fine-tuning
//! data, `train::chat_data`): a Hugging Face `chat_template` (from
//! `tokenizer_config.json`) run by minijinja as written, or, for models without one
//! (llama2.c's), a plain concatenation: every message as `role: content` on its own line,
//! then `assistant:`.

pub use llama::chat::{plain, ChatTemplate, Message};

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
