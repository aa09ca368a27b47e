//! Tokenization (HF `tokenizers`) and image-placeholder expansion.
//!
//! The chat template emits one image token per image (`]<]image[>[` for MiniMax-M3). Before the
//! prompt goes to the worker each one becomes `[start] + image_token × n + [end]`, where n is the
//! image's merged token count (grid_t·grid_h·grid_w / 4) and start/end are the checkpoint's
//! `]<]start of image[>[` / `]<]end of image[>[` tokens when its vocabulary has them. This is
//! exactly what transformers' `MiniMaxM3VLProcessor.replace_image_token` and SGLang 0.5.23's
//! `expand_media_tokens` produce, so the worker sees the same ids either way.

#![allow(clippy::doc_markdown)] // product names (SGLang, MiniMax, HF) in prose are not code

use std::path::Path;

use serde_json::Value as Json;

/// M3's image placeholder and its wrapping tokens (transformers' MiniMaxM3VLProcessor).
pub const M3_IMAGE_TOKEN: &str = "]<]image[>[";
pub const M3_IMAGE_START_TOKEN: &str = "]<]start of image[>[";
pub const M3_IMAGE_END_TOKEN: &str = "]<]end of image[>[";

/// Errors from loading a tokenizer or tokenizing a prompt.
#[derive(Debug)]
pub enum TokenizeError {
    /// tokenizer.json / config.json unreadable or invalid.
    Load(String),
    /// The tokenizer failed on the input.
    Encode(String),
    /// The number of image placeholders in the prompt differs from the number of images.
    ImageCountMismatch { placeholders: usize, images: usize },
    /// The prompt has images but the checkpoint defines no image token.
    NoImageToken,
}

impl std::fmt::Display for TokenizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Load(m) => write!(f, "cannot load tokenizer: {m}"),
            Self::Encode(m) => write!(f, "tokenization failed: {m}"),
            Self::ImageCountMismatch { placeholders, images } => write!(
                f,
                "the rendered prompt has {placeholders} image placeholder(s) but the request has {images} image(s)"
            ),
            Self::NoImageToken => write!(f, "this model does not accept images"),
        }
    }
}

impl std::error::Error for TokenizeError {}

/// The ids that mark an image in `input_ids`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokenIds {
    /// The placeholder repeated once per merged image token (config.json `image_token_id`).
    pub image: u32,
    /// Token before the run, if the vocabulary has one.
    pub start: Option<u32>,
    /// Token after the run, if the vocabulary has one.
    pub end: Option<u32>,
}

/// Where one image's placeholder run sits in the expanded `input_ids`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpan {
    /// Index of the first image token (after the start token).
    pub offset: usize,
    /// Number of image tokens.
    pub length: usize,
}

/// A tokenizer plus the model's image-token ids.
pub struct PromptTokenizer {
    inner: tokenizers::Tokenizer,
    image_ids: Option<ImageTokenIds>,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer").field("image_ids", &self.image_ids).finish_non_exhaustive()
    }
}

/// `image_token_id` (or transformers' serialized name `image_token_index`) at the top of
/// config.json, or inside `text_config`.
fn image_token_from_config(config: &Json) -> Option<u32> {
    let find = |c: &Json| {
        ["image_token_id", "image_token_index"]
            .iter()
            .find_map(|k| c.get(*k).and_then(Json::as_u64))
    };
    find(config)
        .or_else(|| config.get("text_config").and_then(find))
        .and_then(|v| u32::try_from(v).ok())
}

impl PromptTokenizer {
    /// Wrap an already loaded tokenizer.
    pub fn new(inner: tokenizers::Tokenizer, image_ids: Option<ImageTokenIds>) -> Self {
        Self { inner, image_ids }
    }

    /// Load `tokenizer.json` and, from `config.json`, the image token id. Without an
    /// `image_token_id` the vocabulary's `]<]image[>[` is used if present.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TokenizeError> {
        let tok_path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| TokenizeError::Load(format!("{}: {e}", tok_path.display())))?;
        let config: Json = match std::fs::read_to_string(dir.join("config.json")) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| TokenizeError::Load(format!("config.json: {e}")))?,
            Err(_) => Json::Null,
        };
        let image = image_token_from_config(&config).or_else(|| inner.token_to_id(M3_IMAGE_TOKEN));
        let image_ids = image.map(|image| ImageTokenIds {
            image,
            start: inner.token_to_id(M3_IMAGE_START_TOKEN),
            end: inner.token_to_id(M3_IMAGE_END_TOKEN),
        });
        Ok(Self { inner, image_ids })
    }

    /// The image-token ids, if the model takes images.
    pub fn image_ids(&self) -> Option<ImageTokenIds> {
        self.image_ids
    }

    /// Token ids of a rendered prompt. Like transformers' `apply_chat_template(tokenize=True)`,
    /// no special tokens are added: the template already wrote them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a raw prompt (`/v1/completions`) with the tokenizer's special tokens
    /// added, as SGLang's and transformers' default `encode` does.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let enc = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Id of a token string (`None` if not in the vocabulary).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Expand each image placeholder in `ids` to its image's token run; `tokens_per_image[i]`
    /// is image i's merged token count, in prompt order.
    pub fn expand_images(
        &self,
        ids: &[u32],
        tokens_per_image: &[usize],
    ) -> Result<(Vec<u32>, Vec<ImageSpan>), TokenizeError> {
        match self.image_ids {
            Some(image_ids) => expand_image_placeholders(ids, image_ids, tokens_per_image),
            None if tokens_per_image.is_empty() => Ok((ids.to_vec(), Vec::new())),
            None => Err(TokenizeError::NoImageToken),
        }
    }
}

/// Replace the i-th `image_ids.image` token in `ids` by `start? + image × n_i + end?`.
pub fn expand_image_placeholders(
    ids: &[u32],
    image_ids: ImageTokenIds,
    tokens_per_image: &[usize],
) -> Result<(Vec<u32>, Vec<ImageSpan>), TokenizeError> {
    let placeholders = ids.iter().filter(|&&t| t == image_ids.image).count();
    if placeholders != tokens_per_image.len() {
        return Err(TokenizeError::ImageCountMismatch { placeholders, images: tokens_per_image.len() });
    }
    let extra: usize = tokens_per_image.iter().map(|n| n + 1).sum();
    let mut out = Vec::with_capacity(ids.len() + extra + 2 * placeholders);
    let mut spans = Vec::with_capacity(placeholders);
    let mut next = tokens_per_image.iter();
    for &t in ids {
        if t != image_ids.image {
            out.push(t);
            continue;
        }
        // Counted above: one length per placeholder.
        let n = next.next().copied().unwrap_or_default();
        out.extend(image_ids.start);
        spans.push(ImageSpan { offset: out.len(), length: n });
        out.resize(out.len() + n, image_ids.image);
        out.extend(image_ids.end);
    }
    Ok((out, spans))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: ImageTokenIds = ImageTokenIds { image: 7, start: Some(5), end: Some(6) };

    #[test]
    fn expands_each_placeholder_in_order() {
        let (out, spans) = expand_image_placeholders(&[1, 7, 2, 7, 3], IDS, &[2, 3]).unwrap();
        assert_eq!(out, vec![1, 5, 7, 7, 6, 2, 5, 7, 7, 7, 6, 3]);
        assert_eq!(spans, vec![ImageSpan { offset: 2, length: 2 }, ImageSpan { offset: 7, length: 3 }]);
        for s in &spans {
            assert!(out[s.offset..s.offset + s.length].iter().all(|&t| t == 7));
        }
    }

    #[test]
    fn without_start_end_tokens() {
        let ids = ImageTokenIds { image: 7, start: None, end: None };
        let (out, spans) = expand_image_placeholders(&[7, 1], ids, &[4]).unwrap();
        assert_eq!(out, vec![7, 7, 7, 7, 1]);
        assert_eq!(spans, vec![ImageSpan { offset: 0, length: 4 }]);
    }

    #[test]
    fn count_mismatch_is_an_error() {
        let err = expand_image_placeholders(&[1, 7], IDS, &[]).unwrap_err();
        assert!(matches!(err, TokenizeError::ImageCountMismatch { placeholders: 1, images: 0 }));
        assert!(expand_image_placeholders(&[1], IDS, &[3]).is_err());
    }

    #[test]
    fn config_keys() {
        assert_eq!(image_token_from_config(&serde_json::json!({"image_token_index": 200_025})), Some(200_025));
        assert_eq!(image_token_from_config(&serde_json::json!({"text_config": {"image_token_id": 9}})), Some(9));
        assert_eq!(image_token_from_config(&serde_json::json!({})), None);
    }
}
