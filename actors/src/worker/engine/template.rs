//! Chat prompts rendered with the model's own Jinja chat template (minijinja, with the
//! Python string methods Hugging Face templates call).

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or whatever roles the template knows.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// Errors of compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The model's template does not compile.
    #[error("the model's chat template is invalid: {0}")]
    Invalid(String),
    /// Rendering failed: the template refused the conversation (`raise_exception`, for
    /// example roles that do not alternate) or evaluated something it cannot.
    #[error("the chat template refused the conversation: {0}")]
    Render(String),
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `bos_token` / `eos_token` are the texts templates refer to.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| {
            Err::<String, _>(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        // Templates end lines with blocks; Jinja2's defaults as transformers sets them.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| TemplateError::Invalid(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The prompt for `messages`, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Invalid(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| TemplateError::Render(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::worker::engine::tiny::CHATML;

    fn user(text: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: text.into(),
        }
    }

    #[test]
    fn chatml_renders_with_the_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&[user("Hi")]).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('roles must be user or assistant') }}{% endif %}[{{ m.role.upper() }}] {{ m.content.strip() }}\n{% endfor %}";
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[user("  hi  ")]).unwrap(), "<s>[USER] hi\n");
        let bad = [ChatMessage {
            role: "tool".into(),
            content: "x".into(),
        }];
        let err = t.render(&bad).unwrap_err();
        assert!(
            err.to_string().contains("roles must be user or assistant"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_template_is_refused_at_load() {
        assert!(matches!(
            ChatTemplate::new("{% for m in messages %}", "", ""),
            Err(TemplateError::Invalid(_))
        ));
    }
}
