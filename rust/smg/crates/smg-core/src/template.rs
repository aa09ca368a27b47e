//! Chat-template rendering (minijinja) from a Hugging Face model directory.
//!
//! Mirrors what transformers' `apply_chat_template` does: the Jinja source comes from
//! `chat_template.jinja` (transformers >= 4.43 writes it beside the tokenizer) or from the
//! `chat_template` field of `tokenizer_config.json` (a string, or a list of named templates of
//! which `default` is used); the environment uses `trim_blocks` + `lstrip_blocks`, loop controls,
//! Python string methods (`.strip()`, `.startswith()`, ...) and the helpers HF templates call
//! (`raise_exception`, `strftime_now`, `tojson`).
//!
//! Messages are passed as JSON values. Image parts must already be normalised to
//! `{"type": "image"}` (HF convention), so the template emits one image token per image; the
//! tokenizer module then expands each one to the image's token count.

#![allow(clippy::doc_markdown)] // product names (SGLang, MiniMax, HF) in prose are not code

use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde_json::Value as Json;

/// Errors from loading or rendering a chat template.
#[derive(Debug)]
pub enum TemplateError {
    /// No template in the model directory, or it could not be read.
    Missing(String),
    /// The template failed to compile.
    Syntax(String),
    /// Rendering failed (including the template's own `raise_exception`).
    Render(String),
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing(m) => write!(f, "chat template missing: {m}"),
            Self::Syntax(m) => write!(f, "chat template syntax error: {m}"),
            Self::Render(m) => write!(f, "chat template rendering failed: {m}"),
        }
    }
}

impl std::error::Error for TemplateError {}

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// `bos_token` / `eos_token` in tokenizer_config.json are a string or `{"content": ...}`.
fn special_token(config: &Json, key: &str) -> String {
    match config.get(key) {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Object(o)) => o
            .get("content")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

fn template_from_config(config: &Json) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January", "February", "March", "April", "May", "June", "July", "August", "September",
        "October", "November", "December",
    ];
    // Templates use this to print today's date; UTC seconds since the epoch formatted by hand
    // keeps the core free of a time-zone crate. Only %Y %m %d %B %b are supported.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let month = MONTHS[(m - 1) as usize];
    format
        .replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", month)
        .replace("%b", &month[..3])
}

/// Howard Hinnant's days-from-civil inverse.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl ChatTemplate {
    /// Compile `source` with the given special tokens.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| TemplateError::Syntax(format!("{e:#}")))?;
        Ok(Self { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// Load from a model directory: `chat_template.jinja` if present, else
    /// `tokenizer_config.json`'s `chat_template`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| TemplateError::Missing(format!("{}: {e}", config_path.display())))?,
            Err(_) => Json::Null,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = match std::fs::read_to_string(&jinja_path) {
            Ok(s) => s,
            Err(_) => template_from_config(&config).ok_or_else(|| {
                TemplateError::Missing(format!(
                    "neither {} nor a chat_template in {}",
                    jinja_path.display(),
                    config_path.display()
                ))
            })?,
        };
        Self::new(&source, &special_token(&config, "bos_token"), &special_token(&config, "eos_token"))
    }

    /// Render `messages` (a JSON array of `{"role", "content"}`) to the prompt text.
    pub fn render(&self, messages: &Json, add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_with(messages, add_generation_prompt, &Json::Null)
    }

    /// Like [`render`](Self::render), with extra template variables (e.g. `tools`); `extra`
    /// must be a JSON object or null.
    pub fn render_with(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        extra: &Json,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        if let Json::Object(extra) = extra {
            ctx.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        ctx.insert("bos_token".into(), Json::String(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Json::String(self.eos_token.clone()));
        tmpl.render(Value::from_serialize(&ctx)).map_err(|e| {
            // The template's own raise_exception message is what a client should see.
            let msg = if e.kind() == ErrorKind::InvalidOperation {
                e.detail().unwrap_or("invalid operation").to_owned()
            } else {
                format!("{e:#}")
            };
            TemplateError::Render(msg)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const QWEN_LIKE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}\
{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}\
{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\
{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_text_and_image_parts() {
        let t = ChatTemplate::new(QWEN_LIKE, "", "</s>").unwrap();
        let msgs = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}
        ]);
        let out = t.render(&msgs, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n<image>what?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn trim_blocks_and_pycompat_methods() {
        let src = "{% for m in messages %}\n  {{ m.content.strip() }}|{{ m.role.upper() }}\n{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t.render(&json!([{"role": "user", "content": "  hi  "}]), false).unwrap();
        // lstrip_blocks strips before `{%` only, so the indentation before `{{` stays (as in jinja2).
        assert_eq!(out, "  hi|USER\n");
    }

    #[test]
    fn raise_exception_message_is_surfaced() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let err = t.render(&json!([{"role": "assistant", "content": "x"}]), false).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(TemplateError::Syntax(_))));
    }

    #[test]
    fn loads_from_tokenizer_config_with_named_templates() {
        let dir = std::env::temp_dir().join(format!("smg-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = json!({
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D{{ eos_token }}"}]
        });
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::from_model_dir(&dir).unwrap();
        assert_eq!(t.render(&json!([]), false).unwrap(), "<s>D</s>");
        std::fs::write(dir.join("chat_template.jinja"), "J").unwrap();
        let t = ChatTemplate::from_model_dir(&dir).unwrap();
        assert_eq!(t.render(&json!([]), false).unwrap(), "J");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_783), (2026, 11, 26));
    }
}
