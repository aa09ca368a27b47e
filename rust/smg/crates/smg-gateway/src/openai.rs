//! OpenAI request shapes the gateway accepts, and the sampling parameters they map to.
//! Unknown fields are ignored (clients send many); known fields are type-checked.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by chat and text completions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `image_url` part body.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageUrl {
    pub url: String,
    /// Accepted and ignored (M3 has one resolution policy).
    #[allow(dead_code)]
    pub detail: Option<String>,
    /// M3's per-image size option: a multiple of 28, at most 3584.
    pub max_long_side_pixel: Option<u32>,
}

/// One part of a multimodal message.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `prompt`: a string, or a list holding exactly one string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl Prompt {
    pub fn single(self) -> Result<String, ApiError> {
        match self {
            Prompt::One(s) => Ok(s),
            Prompt::Many(mut v) if v.len() == 1 => Ok(v.remove(0)),
            Prompt::Many(_) => Err(ApiError::bad_request("only one prompt per request is supported").with_param("prompt")),
        }
    }
}

/// The image references of a chat request, in prompt order.
pub fn image_refs(messages: &[Message]) -> Vec<&ImageUrl> {
    messages
        .iter()
        .filter_map(|m| match &m.content {
            Some(Content::Parts(p)) => Some(p),
            _ => None,
        })
        .flatten()
        .filter_map(|p| match p {
            ContentPart::ImageUrl { image_url } => Some(image_url),
            ContentPart::Text { .. } => None,
        })
        .collect()
}

/// Messages as the chat template sees them: image parts become `{"type": "image"}`.
pub fn template_messages(messages: &[Message]) -> Value {
    let msgs = messages
        .iter()
        .map(|m| {
            let mut o = Map::new();
            o.insert("role".into(), Value::String(m.role.clone()));
            let content = match &m.content {
                None => Value::Null,
                Some(Content::Text(t)) => Value::String(t.clone()),
                Some(Content::Parts(parts)) => Value::Array(
                    parts
                        .iter()
                        .map(|p| match p {
                            ContentPart::Text { text } => json!({"type": "text", "text": text}),
                            ContentPart::ImageUrl { .. } => json!({"type": "image"}),
                        })
                        .collect(),
                ),
            };
            o.insert("content".into(), content);
            if let Some(n) = &m.name {
                o.insert("name".into(), Value::String(n.clone()));
            }
            Value::Object(o)
        })
        .collect();
    Value::Array(msgs)
}

fn check_range(v: Option<f32>, lo: f32, hi: f32, name: &'static str) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => {
            Err(ApiError::bad_request(format!("{name} must be in [{lo}, {hi}], got {x}")).with_param(name))
        }
        _ => Ok(()),
    }
}

impl Sampling {
    /// SGLang `sampling_params`, after checking ranges. `default_max_tokens` applies when the
    /// client sets neither max_tokens nor max_completion_tokens.
    pub fn to_sglang(&self, default_max_tokens: u32, max_max_tokens: u32) -> Result<Value, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::bad_request(format!("n={n} is not supported: only n=1")).with_param("n"));
            }
        }
        check_range(self.temperature, 0.0, 2.0, "temperature")?;
        check_range(self.top_p, 0.0, 1.0, "top_p")?;
        check_range(self.min_p, 0.0, 1.0, "min_p")?;
        check_range(self.frequency_penalty, -2.0, 2.0, "frequency_penalty")?;
        check_range(self.presence_penalty, -2.0, 2.0, "presence_penalty")?;
        check_range(self.repetition_penalty, 0.0, 2.0, "repetition_penalty")?;
        if self.top_p == Some(0.0) {
            return Err(ApiError::bad_request("top_p must be > 0").with_param("top_p"));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens).unwrap_or(default_max_tokens);
        if max_tokens == 0 || max_tokens > max_max_tokens {
            return Err(ApiError::bad_request(format!("max_tokens must be in [1, {max_max_tokens}], got {max_tokens}"))
                .with_param("max_tokens"));
        }
        let mut p = Map::new();
        p.insert("max_new_tokens".into(), json!(max_tokens));
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                p.insert(k.into(), v);
            }
        };
        put("temperature", self.temperature.map(|v| json!(v)));
        put("top_p", self.top_p.map(|v| json!(v)));
        put("top_k", self.top_k.map(|v| json!(v)));
        put("min_p", self.min_p.map(|v| json!(v)));
        put("frequency_penalty", self.frequency_penalty.map(|v| json!(v)));
        put("presence_penalty", self.presence_penalty.map(|v| json!(v)));
        put("repetition_penalty", self.repetition_penalty.map(|v| json!(v)));
        put("sampling_seed", self.seed.map(|v| json!(v)));
        if self.ignore_eos {
            put("ignore_eos", Some(Value::Bool(true)));
        }
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 16 || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(ApiError::bad_request("stop: at most 16 non-empty strings of at most 256 bytes").with_param("stop"));
        }
        if !stop.is_empty() {
            p.insert("stop".into(), json!(stop));
        }
        Ok(Value::Object(p))
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multimodal_chat() {
        let r: ChatRequest = serde_json::from_value(json!({
            "model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
            "max_tokens": 5, "stop": "x", "seed": 3, "stream": true, "stream_options": {"include_usage": true},
            "logprobs": false, "user": "ignored"
        }))
        .unwrap();
        assert_eq!(image_refs(&r.messages).len(), 1);
        assert!(r.sampling.include_usage());
        let tm = template_messages(&r.messages);
        assert_eq!(tm[0]["content"][1], json!({"type": "image"}));
        let p = r.sampling.to_sglang(16, 100).unwrap();
        assert_eq!(p, json!({"max_new_tokens": 5, "stop": ["x"], "sampling_seed": 3}));
    }

    #[test]
    fn rejects_bad_sampling() {
        let s = Sampling { n: Some(2), ..Default::default() };
        assert_eq!(s.to_sglang(16, 100).unwrap_err().param, Some("n"));
        let s = Sampling { temperature: Some(9.0), ..Default::default() };
        assert_eq!(s.to_sglang(16, 100).unwrap_err().param, Some("temperature"));
        let s = Sampling { max_tokens: Some(1000), ..Default::default() };
        assert_eq!(s.to_sglang(16, 100).unwrap_err().param, Some("max_tokens"));
    }
}
