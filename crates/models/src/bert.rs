//! BERT encoders in Hugging Face's layout (`BertModel`): word + position +
//! token-type embeddings, post-LayerNorm self-attention and feed-forward
//! blocks and a pooler. Loads `config.json` and `model.safetensors` as
//! Hugging Face writes them, e.g. all-MiniLM-L6-v2.
//!
//! Linear weights are kept `[in, out]` (Kiln's `Dense` layout); Hugging Face
//! stores them `[out, in]`, so loading transposes them once.

use crate::checkpoint::{Checkpoint, ModelError, NamedValues, StagedState};
use crate::layers::{Activation, Dense, Layer, Mode};
use kiln_graph::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The fields of a Hugging Face BERT `config.json` that shape the model.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct BertConfig {
    /// Rows of the word-embedding table: the tokenizer's vocabulary size.
    pub vocab_size: usize,
    /// Width of every token's hidden state; a multiple of `num_attention_heads`.
    pub hidden_size: usize,
    /// Encoder blocks.
    pub num_hidden_layers: usize,
    /// Attention heads per block, each `hidden_size / num_attention_heads` wide.
    pub num_attention_heads: usize,
    /// Width of each block's feed-forward layer.
    pub intermediate_size: usize,
    /// Longest input, in tokens (rows of the position-embedding table).
    pub max_position_embeddings: usize,
    /// Segment (token-type) ids the model knows, usually 2.
    pub type_vocab_size: usize,
    /// Epsilon of every LayerNorm; must be positive.
    pub layer_norm_eps: f32,
    /// Feed-forward activation; only `"gelu"` (exact erf, the default) is accepted.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// How positions are encoded; only `"absolute"` (learned embeddings per
    /// position, the default) is accepted: a relative-position model loaded
    /// as absolute would run without error and compute something else.
    #[serde(default = "default_positions")]
    pub position_embedding_type: String,
    /// Hugging Face's architecture name, `"bert"` where given. RoBERTa-family
    /// configs have BERT's fields but count positions from 2, so a model of
    /// theirs would load and compute something else: they are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Dropout after the embeddings and after each block's sublayers, in training
    /// mode; in `[0, 1)`. 0 where a `config.json` leaves it out;
    /// [`BertConfig::default`] has 0.1, as Hugging Face's.
    #[serde(default)]
    pub hidden_dropout_prob: f32,
    /// Dropout on the attention weights, in training mode; in `[0, 1)`. 0
    /// where a `config.json` leaves it out; 0.1 in [`BertConfig::default`].
    #[serde(default)]
    pub attention_probs_dropout_prob: f32,
}

/// BERT-base's shape (`bert-base-uncased`, as Hugging Face's `BertConfig()`
/// defaults): 12 blocks of width 768, 12 heads, feed-forward 3072, the
/// 30,522-token WordPiece vocabulary, dropout 0.1. Other sizes override
/// fields:
///
/// ```
/// use kiln_models::bert::BertConfig;
/// // all-MiniLM-L6-v2's shape.
/// let minilm = BertConfig {
///     hidden_size: 384,
///     num_hidden_layers: 6,
///     intermediate_size: 1536,
///     ..BertConfig::default()
/// };
/// assert_eq!(minilm.hidden_size / minilm.num_attention_heads, 32);
/// ```
impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30_522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: default_act(),
            position_embedding_type: default_positions(),
            model_type: None,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
        }
    }
}

fn default_act() -> String {
    "gelu".into()
}

fn default_positions() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not a BERT config.json: {e}"),
        })?;
        config.check().map_err(|reason| ModelError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        for (name, size) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if size == 0 {
                return Err(format!("{name} is 0"));
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps {} must be a positive number",
                self.layer_norm_eps
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} {p} must be in [0, 1)"));
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act {:?}: Kiln's BERT implements \"gelu\" (exact erf)",
                self.hidden_act
            ));
        }
        if let Some(other) = self.model_type.as_deref().filter(|t| *t != "bert") {
            return Err(format!(
                "model_type {other:?}: Kiln loads BERT (\"bert\") checkpoints"
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?}: Kiln's BERT implements \"absolute\" positions",
                self.position_embedding_type
            ));
        }
        Ok(())
    }
}

/// Layer normalisation over the last axis with learned scale and shift.
pub struct LayerNorm {
    /// Scale, `[features]`, starting at one.
    pub gamma: Tensor,
    /// Shift, `[features]`, starting at zero.
    pub beta: Tensor,
    /// Added to the variance before its square root.
    pub eps: f32,
}

impl LayerNorm {
    /// A trainable LayerNorm over `features` values: `gamma` ones, `beta` zeros.
    pub fn new(device: &Device, features: usize, eps: f32) -> Result<Self, ModelError> {
        Ok(Self {
            gamma: Tensor::ones(device, &[features])?.requires_grad(true),
            beta: Tensor::zeros(device, &[features])?.requires_grad(true),
            eps,
        })
    }

    /// Normalises `x` over its last axis, then scales and shifts it.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(x.layer_norm(&self.gamma, &self.beta, self.eps)?)
    }

    /// `LayerNorm(x + residual)`, the residual sum never written out.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor, ModelError> {
        Ok(x.add_layer_norm(residual, &self.gamma, &self.beta, self.eps)?)
    }
}

/// Word, position and token-type embeddings, summed and normalised.
pub struct BertEmbeddings {
    /// `[vocab_size, hidden_size]` word-piece embeddings.
    pub word: Tensor,
    /// `[max_position_embeddings, hidden_size]` learned position embeddings.
    pub position: Tensor,
    /// `[type_vocab_size, hidden_size]` segment embeddings.
    pub token_type: Tensor,
    /// LayerNorm applied to the sum.
    pub norm: LayerNorm,
}

/// One encoder block: self-attention, then feed-forward, each followed by a
/// residual connection and LayerNorm.
pub struct BertLayer {
    /// Query projection, `[hidden, hidden]`.
    pub query: Dense,
    /// Key projection, `[hidden, hidden]`.
    pub key: Dense,
    /// Value projection, `[hidden, hidden]`.
    pub value: Dense,
    /// Projection of the concatenated heads back to `hidden`.
    pub attention_output: Dense,
    /// LayerNorm after the attention's residual sum.
    pub attention_norm: LayerNorm,
    /// Feed-forward expansion, `[hidden, intermediate]`, with GELU.
    pub intermediate: Dense,
    /// Feed-forward projection back, `[intermediate, hidden]`.
    pub output: Dense,
    /// LayerNorm after the feed-forward's residual sum.
    pub output_norm: LayerNorm,
}

/// A BERT encoder (`BertModel` without task heads).
pub struct Bert {
    /// The sizes the model was built with.
    pub config: BertConfig,
    /// Token, position and segment embeddings.
    pub embeddings: BertEmbeddings,
    /// Encoder blocks, applied in order.
    pub layers: Vec<BertLayer>,
    /// `tanh(W h_[CLS] + b)`, as Hugging Face's `BertModel` has; loading a
    /// checkpoint requires its weights (`pooler.dense.*`).
    pub pooler: Dense,
}

/// Token ids of a padded batch and its attention mask (1 real, 0 padding).
pub struct BertInput<'a> {
    /// Token ids, `batch * tokens` of them, row-major.
    pub ids: &'a [u32],
    /// Attention mask, `batch * tokens` values: 1 for real tokens, 0 for padding.
    pub mask: &'a [f32],
    /// `[batch, tokens]`.
    pub shape: [usize; 2],
    /// Segment of each token (0 for the first sentence, 1 for the second of a
    /// pair); `None` means all 0.
    pub token_types: Option<&'a [u32]>,
}

impl Bert {
    /// A randomly initialised model (uniform in +-0.05 for embeddings and
    /// Glorot for linear layers), for training from scratch and for tests.
    pub fn new(device: &Device, config: BertConfig, seed: u64) -> Result<Self, ModelError> {
        config.check().map_err(ModelError::Invalid)?;
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let table = |rows: usize, s: u64| -> Result<Tensor, ModelError> {
            Ok(Tensor::uniform(device, &[rows, h], -0.05, 0.05, s)?.requires_grad(true))
        };
        let embeddings = BertEmbeddings {
            word: table(config.vocab_size, seed)?,
            position: table(config.max_position_embeddings, seed.wrapping_add(1))?,
            token_type: table(config.type_vocab_size, seed.wrapping_add(2))?,
            norm: LayerNorm::new(device, h, eps)?,
        };
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            let s = seed.wrapping_add(10 * (l as u64 + 1));
            let dense = |i, o, act, k| Dense::new(device, i, o, act, s.wrapping_add(k));
            layers.push(BertLayer {
                query: dense(h, h, Activation::None, 0)?,
                key: dense(h, h, Activation::None, 1)?,
                value: dense(h, h, Activation::None, 2)?,
                attention_output: dense(h, h, Activation::None, 3)?,
                attention_norm: LayerNorm::new(device, h, eps)?,
                intermediate: dense(h, config.intermediate_size, Activation::Gelu, 4)?,
                output: dense(config.intermediate_size, h, Activation::None, 5)?,
                output_norm: LayerNorm::new(device, h, eps)?,
            });
        }
        let pooler = Dense::new(device, h, h, Activation::Tanh, seed.wrapping_add(3))?;
        Ok(Self {
            config,
            embeddings,
            layers,
            pooler,
        })
    }

    /// Loads `config.json` and `model.safetensors` from a Hugging Face model
    /// directory.
    pub fn from_pretrained(device: &Device, dir: &Path) -> Result<Self, ModelError> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        // Before building anything: a config that disagrees with the weights
        // (a corrupt layer count, say) would otherwise allocate for nothing.
        check_layer_count(&Checkpoint::open(&weights)?, &config)?;
        let model = Self::new(device, config, 0)?;
        model.load_safetensors(&weights)?;
        Ok(model)
    }

    /// Parameters under Hugging Face's names (without the `bert.` prefix).
    /// Linear weights are `[in, out]` here, `[out, in]` in their files.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let e = &self.embeddings;
        out.push(("embeddings.word_embeddings.weight".into(), e.word.clone()));
        out.push((
            "embeddings.position_embeddings.weight".into(),
            e.position.clone(),
        ));
        out.push((
            "embeddings.token_type_embeddings.weight".into(),
            e.token_type.clone(),
        ));
        push_norm(&mut out, "embeddings.LayerNorm", &e.norm);
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{l}.");
            push_dense(&mut out, &format!("{p}attention.self.query"), &layer.query);
            push_dense(&mut out, &format!("{p}attention.self.key"), &layer.key);
            push_dense(&mut out, &format!("{p}attention.self.value"), &layer.value);
            push_dense(
                &mut out,
                &format!("{p}attention.output.dense"),
                &layer.attention_output,
            );
            push_norm(
                &mut out,
                &format!("{p}attention.output.LayerNorm"),
                &layer.attention_norm,
            );
            push_dense(
                &mut out,
                &format!("{p}intermediate.dense"),
                &layer.intermediate,
            );
            push_dense(&mut out, &format!("{p}output.dense"), &layer.output);
            push_norm(
                &mut out,
                &format!("{p}output.LayerNorm"),
                &layer.output_norm,
            );
        }
        push_dense(&mut out, "pooler.dense", &self.pooler);
        out
    }

    /// Every parameter, in [`Bert::named_parameters`] order.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    /// Fills the parameters from a Hugging Face safetensors file (F32, F16 or
    /// BF16; names with or without the `bert.` prefix). Every parameter must be
    /// present with its shape; tensors the model does not have are an error,
    /// except `embeddings.position_ids` (a buffer) and pre-training heads
    /// (`cls.*`).
    pub fn load_safetensors(&self, path: &Path) -> Result<(), ModelError> {
        let file = Checkpoint::open(path)?;
        let names = file.names();
        let prefix = if names.iter().any(|n| n.starts_with("bert.")) {
            "bert."
        } else {
            ""
        };
        let params = prefixed(prefix, self.named_parameters());
        let position_ids = format!("{prefix}embeddings.position_ids");
        load_hf_layout(&file, &params, &[position_ids.as_str(), "cls."])
    }

    /// Writes the parameters in Hugging Face's layout and names (Linear weights
    /// `[out, in]`), atomically, so the file loads here and in `transformers`.
    pub fn save_safetensors(&self, path: &Path) -> Result<(), ModelError> {
        crate::checkpoint::save(
            path,
            &hf_layout(&self.named_parameters())?,
            &Default::default(),
        )
    }

    /// The last hidden state, `[batch, tokens, hidden]`, for a padded batch.
    /// Padded keys get no attention; padded positions' outputs are computed
    /// but meaningless.
    pub fn forward(&self, input: &BertInput, mode: &mut Mode) -> Result<Tensor, ModelError> {
        let [batch, tokens] = input.shape;
        let c = &self.config;
        let types_len = input.token_types.map_or(batch * tokens, <[u32]>::len);
        if input.ids.len() != batch * tokens
            || input.mask.len() != batch * tokens
            || types_len != batch * tokens
        {
            return Err(ModelError::Invalid(format!(
                "bert: {} ids, {} mask values and {types_len} token types for a [{batch}, {tokens}] batch",
                input.ids.len(),
                input.mask.len()
            )));
        }
        if tokens > c.max_position_embeddings {
            return Err(ModelError::Invalid(format!(
                "bert: {tokens} tokens exceed the model's {} positions; truncate the input",
                c.max_position_embeddings
            )));
        }
        let e = &self.embeddings;
        let device = e.word.device();
        let types = match input.token_types {
            Some(types) => e.token_type.embedding(types, &input.shape)?,
            // Single-segment input: one row, broadcast over every token.
            None => e.token_type.slice(0, 0, 1)?,
        };
        let x = e
            .word
            .embedding(input.ids, &input.shape)?
            .add(&e.position.slice(0, 0, tokens)?)?
            .add(&types)?;
        let mut x = dropout(&e.norm.forward(&x)?, c.hidden_dropout_prob, mode)?;
        // 0 where attended, -1e9 on padded keys: exp underflows to exactly 0.
        let bias: Vec<f32> = input.mask.iter().map(|&m| (m - 1.0) * 1e9).collect();
        let bias = Tensor::from_slice(device, &bias, &[batch, 1, 1, tokens])?;
        for layer in &self.layers {
            x = self.block(layer, &x, &bias, mode)?;
        }
        Ok(x)
    }

    /// Hugging Face's `pooler_output`: `tanh(W h_[CLS] + b)` from the first
    /// token's last hidden state, `[batch, hidden]`.
    pub fn pool(&self, hidden: &Tensor, mode: &mut Mode) -> Result<Tensor, ModelError> {
        let &[batch, _, h] = hidden.shape() else {
            return Err(ModelError::Invalid(format!(
                "pool: expected [batch, tokens, hidden], got {:?}",
                hidden.shape()
            )));
        };
        let first = hidden.slice(1, 0, 1)?.reshape(&[batch, h])?;
        self.pooler.forward(&first, mode)
    }

    fn block(
        &self,
        layer: &BertLayer,
        x: &Tensor,
        bias: &Tensor,
        mode: &mut Mode,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        // Three products of the same input: one dispatch where they fuse.
        let (query, key, value) = x.device().together(|| -> Result<_, ModelError> {
            Ok((
                layer.query.forward(x, mode)?,
                layer.key.forward(x, mode)?,
                layer.value.forward(x, mode)?,
            ))
        })?;
        let context = multi_head_attention(
            &query,
            &key,
            &value,
            bias,
            c.num_attention_heads,
            c.attention_probs_dropout_prob,
            mode,
        )?;
        let attended = dropout(
            &layer.attention_output.forward(&context, mode)?,
            c.hidden_dropout_prob,
            mode,
        )?;
        let x = layer.attention_norm.forward_residual(x, &attended)?;
        let ff = layer.intermediate.forward(&x, mode)?;
        let ff = dropout(
            &layer.output.forward(&ff, mode)?,
            c.hidden_dropout_prob,
            mode,
        )?;
        layer.output_norm.forward_residual(&x, &ff)
    }
}

/// Scaled dot-product attention over `heads` heads: `q`, `k`, `v` are
/// `[batch, tokens, hidden]`, `bias` is added to the scores before the softmax
/// (broadcast to `[batch, heads, tokens, tokens]`; `[batch, 1, 1, tokens]` with
/// -1e9 on padded keys masks them). Dropout `p` applies to the attention
/// probabilities in training mode. Returns `[batch, tokens, hidden]`.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    p: f32,
    mode: &mut Mode,
) -> Result<Tensor, ModelError> {
    let &[batch, tokens, hidden] = q.shape() else {
        return Err(ModelError::Invalid(format!(
            "attention: q must be [batch, tokens, hidden], got {:?}",
            q.shape()
        )));
    };
    if heads == 0 || hidden % heads != 0 {
        return Err(ModelError::Invalid(format!(
            "attention: {hidden} features do not split into {heads} heads"
        )));
    }
    let d = hidden / heads;
    // [b, t, h] -> [b * heads, t, d] (or [b * heads, d, t] for keys).
    let split = |t: &Tensor, perm: &[usize]| -> Result<Tensor, ModelError> {
        let t = t.reshape(&[batch, tokens, heads, d])?.permute(perm)?;
        let shape = t.shape().to_vec();
        Ok(t.reshape(&[batch * heads, shape[2], shape[3]])?)
    };
    let (q, k, v) = (
        split(q, &[0, 2, 1, 3])?,
        split(k, &[0, 2, 3, 1])?,
        split(v, &[0, 2, 1, 3])?,
    );
    let scores = q.matmul(&k)?.reshape(&[batch, heads, tokens, tokens])?;
    let scale = 1.0 / (d as f32).sqrt();
    let probs = if bias.shape() == [batch, 1, 1, tokens] {
        // A padding mask: scaling and mask fused into the softmax, one pass
        // over the scores.
        scores.softmax_scaled(scale, Some(bias))?
    } else {
        // Any other broadcastable bias (a causal mask, per-head biases).
        scores.mul_scalar(scale)?.add(bias)?.softmax()?
    };
    let probs = dropout(&probs, p, mode)?;
    Ok(probs
        .reshape(&[batch * heads, tokens, tokens])?
        .matmul(&v)?
        .reshape(&[batch, heads, tokens, d])?
        .permute(&[0, 2, 1, 3])?
        .reshape(&[batch, tokens, hidden])?)
}

/// Mean of the real tokens' states (sentence-transformers' mean pooling):
/// `[batch, tokens, hidden]` and a `[batch, tokens]` mask to `[batch, hidden]`.
pub fn mean_pool(hidden: &Tensor, mask: &[f32]) -> Result<Tensor, ModelError> {
    let &[batch, tokens, _] = hidden.shape() else {
        return Err(ModelError::Invalid(format!(
            "mean_pool: expected [batch, tokens, hidden], got {:?}",
            hidden.shape()
        )));
    };
    if tokens == 0 || mask.len() != batch * tokens {
        return Err(ModelError::Invalid(format!(
            "mean_pool: a mask of {} values for hidden states {:?}; it needs one per token, \
             and at least one token",
            mask.len(),
            hidden.shape()
        )));
    }
    // Weights 1/count on real tokens, 0 on padding: one batched product.
    let mut weights = mask.to_vec();
    for row in weights.chunks_mut(tokens) {
        let count: f32 = row.iter().sum();
        row.iter_mut().for_each(|w| *w /= count.max(1.0));
    }
    let weights = Tensor::from_slice(hidden.device(), &weights, &[batch, 1, tokens])?;
    let pooled = weights.matmul(hidden)?;
    let hidden_size = pooled.shape()[2];
    Ok(pooled.reshape(&[batch, hidden_size])?)
}

/// Rows scaled to unit L2 norm (sentence-transformers' `Normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor, ModelError> {
    let Some(last) = x.rank().checked_sub(1) else {
        return Err(ModelError::Invalid(
            "l2_normalize: a scalar has no rows to normalise".into(),
        ));
    };
    let norm = x.square()?.sum(last, true)?.add_scalar(1e-24)?.sqrt()?;
    Ok(x.div(&norm)?)
}

fn dropout(x: &Tensor, p: f32, mode: &mut Mode) -> Result<Tensor, ModelError> {
    if !mode.training || p == 0.0 {
        return Ok(x.clone());
    }
    Ok(x.dropout(p, mode.next_seed(), true)?)
}

/// Linear layers' weights are the 2-D `.weight`s outside the embeddings.
/// `params` renamed with `prefix`.
fn prefixed(prefix: &str, params: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    params
        .into_iter()
        .map(|(name, t)| (format!("{prefix}{name}"), t))
        .collect()
}

/// `params` as Hugging Face stores them: Linear weights `[out, in]`.
fn hf_layout(params: &[(String, Tensor)]) -> Result<Vec<NamedValues>, ModelError> {
    let mut tensors = Vec::with_capacity(params.len());
    for (name, t) in params {
        let values = t.to_vec()?;
        if is_linear_weight(name, t.shape()) {
            let (rows, cols) = (t.shape()[0], t.shape()[1]);
            tensors.push((
                name.clone(),
                vec![cols, rows],
                transpose(&values, rows, cols),
            ));
        } else {
            tensors.push((name.clone(), t.shape().to_vec(), values));
        }
    }
    Ok(tensors)
}

/// Fills `params` from `file` in Hugging Face's layout, after checking that
/// the names match exactly (names starting with one of `ignore` aside).
fn load_hf_layout(
    file: &Checkpoint,
    params: &[(String, Tensor)],
    ignore: &[&str],
) -> Result<(), ModelError> {
    let expected: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    file.check_names(&expected, ignore)?;
    // All read and checked before any is copied: a bad tensor part-way
    // leaves the model as it was.
    let mut staged = StagedState::default();
    for (name, t) in params {
        let shape = t.shape();
        let values = if is_linear_weight(name, shape) {
            // Stored [out, in] = [cols, rows] of ours.
            let (rows, cols) = (shape[0], shape[1]);
            transpose(&file.tensor_f32(name, &[cols, rows])?, cols, rows)
        } else {
            file.tensor_f32(name, shape)?
        };
        staged.push(t, values);
    }
    staged.apply()
}

fn is_linear_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.ends_with(".weight") && !name.contains("embeddings.")
}

/// A `rows x cols` row-major matrix transposed.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

fn push_dense(out: &mut Vec<(String, Tensor)>, name: &str, d: &Dense) {
    out.push((format!("{name}.weight"), d.weight.clone()));
    out.push((format!("{name}.bias"), d.bias.clone()));
}

fn push_norm(out: &mut Vec<(String, Tensor)>, name: &str, n: &LayerNorm) {
    out.push((format!("{name}.weight"), n.gamma.clone()));
    out.push((format!("{name}.bias"), n.beta.clone()));
}

/// Which summary of the token states a [`BertClassifier`]'s head reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The mean over real tokens: what sentence-transformers models such as
    /// MiniLM were trained to make meaningful.
    #[default]
    Mean,
    /// The pooler on the `[CLS]` state, as Hugging Face's
    /// `BertForSequenceClassification` does.
    Cls,
}

impl Pooling {
    fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [Pooling::Mean, Pooling::Cls]
            .into_iter()
            .find(|p| p.name() == name)
    }
}

/// BERT with a linear classification head on a pooled summary of the token
/// states: `logits = W pool(h) + b`.
pub struct BertClassifier {
    /// The encoder.
    pub bert: Bert,
    /// Linear layer from the pooled `[batch, hidden]` to `[batch, classes]` logits.
    pub head: Dense,
    /// How the token states are summarised for the head.
    pub pooling: Pooling,
}

impl BertClassifier {
    /// Puts a freshly initialised head for `classes` classes on `bert`, with mean
    /// pooling ([`BertClassifier::with_pooling`] changes it).
    pub fn new(bert: Bert, classes: usize, seed: u64) -> Result<Self, ModelError> {
        crate::layers::require_positive("BertClassifier", &[("classes", classes)])?;
        let device = bert.embeddings.word.device().clone();
        let head = Dense::new(
            &device,
            bert.config.hidden_size,
            classes,
            Activation::None,
            seed,
        )?;
        Ok(Self {
            bert,
            head,
            pooling: Pooling::Mean,
        })
    }

    /// The same model reading another summary of the token states.
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// Logits `[batch, classes]`.
    pub fn forward(&self, input: &BertInput, mode: &mut Mode) -> Result<Tensor, ModelError> {
        let hidden = self.bert.forward(input, mode)?;
        let pooled = match self.pooling {
            Pooling::Mean => mean_pool(&hidden, input.mask)?,
            Pooling::Cls => self.bert.pool(&hidden, mode)?,
        };
        self.head.forward(&pooled, mode)
    }

    /// Freezes the embeddings and the first `layers` encoder blocks: they get
    /// no gradients (the backward pass stops above them) and optimizers skip
    /// them. The pooler trains with [`Pooling::Cls`] and is frozen (unused)
    /// with [`Pooling::Mean`].
    pub fn freeze(&self, layers: usize) {
        for (name, t) in self.bert.named_parameters() {
            let block = name
                .strip_prefix("encoder.layer.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|index| index.parse::<usize>().ok());
            let frozen = name.starts_with("embeddings.")
                || (name.starts_with("pooler.") && self.pooling == Pooling::Mean)
                || block.is_some_and(|b| b < layers);
            t.set_requires_grad(!frozen);
        }
    }

    /// The encoder's parameters that are not frozen.
    pub fn trainable_encoder_parameters(&self) -> Vec<Tensor> {
        self.bert
            .parameters()
            .into_iter()
            .filter(Tensor::is_requires_grad)
            .collect()
    }

    /// [`BertClassifier::trainable_encoder_parameters`] split as Hugging
    /// Face's fine-tuning scripts split them for weight decay: the weight
    /// matrices and embedding tables (decayed), then the biases and layer
    /// norms' scales and shifts (not decayed).
    pub fn trainable_encoder_parameters_by_decay(&self) -> (Vec<Tensor>, Vec<Tensor>) {
        let (decayed, not): (Vec<_>, Vec<_>) = self
            .bert
            .named_parameters()
            .into_iter()
            .filter(|(_, t)| t.is_requires_grad())
            .partition(|(name, _)| !name.ends_with(".bias") && !name.contains("LayerNorm"));
        let tensors = |v: Vec<(String, Tensor)>| v.into_iter().map(|(_, t)| t).collect();
        (tensors(decayed), tensors(not))
    }

    /// The head's weight and bias.
    pub fn head_parameters(&self) -> Vec<Tensor> {
        vec![self.head.weight.clone(), self.head.bias.clone()]
    }

    /// Every parameter under the names its checkpoint uses: the encoder's
    /// Hugging Face names with `bert.`, then `head.weight` and `head.bias`.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut params = prefixed("bert.", self.bert.named_parameters());
        params.push((format!("{CLASSIFIER_HEAD}weight"), self.head.weight.clone()));
        params.push((format!("{CLASSIFIER_HEAD}bias"), self.head.bias.clone()));
        params
    }

    /// Saves encoder and head in one safetensors file, atomically, with the
    /// encoder's config, the pooling and `metadata` (e.g. tokenizer settings)
    /// in its header, so [`BertClassifier::open`] needs nothing else. The head
    /// is named `head.*`, not Hugging Face's `classifier`, so no other library
    /// loads a mean-pooling head as its pooler-reading one.
    pub fn save_safetensors(
        &self,
        path: &Path,
        metadata: &HashMap<String, String>,
    ) -> Result<(), ModelError> {
        let mut header = metadata.clone();
        header.insert(MODEL_KEY.into(), CLASSIFIER_MODEL.into());
        header.insert(POOLING_KEY.into(), self.pooling.name().into());
        header.insert(
            CONFIG_KEY.into(),
            serde_json::to_string(&self.bert.config).expect("a config always serialises"),
        );
        crate::checkpoint::save(path, &hf_layout(&self.named_parameters())?, &header)
    }

    /// Loads a classifier written by [`BertClassifier::save_safetensors`],
    /// with the metadata it was saved with.
    pub fn open(
        device: &Device,
        path: &Path,
    ) -> Result<(Self, HashMap<String, String>), ModelError> {
        let file = Checkpoint::open(path)?;
        let metadata = file.metadata();
        let bad = |reason: String| ModelError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        if metadata.get(MODEL_KEY).map(String::as_str) != Some(CLASSIFIER_MODEL) {
            return Err(bad(format!(
                "not a fine-tuned BERT classifier (no `{MODEL_KEY}: {CLASSIFIER_MODEL}` metadata); \
                 write one with `kiln finetune bert`"
            )));
        }
        let config: BertConfig = metadata
            .get(CONFIG_KEY)
            .ok_or_else(|| bad(format!("no `{CONFIG_KEY}` metadata")))
            .and_then(|json| {
                serde_json::from_str(json).map_err(|e| bad(format!("bad `{CONFIG_KEY}`: {e}")))
            })?;
        config.check().map_err(&bad)?;
        check_layer_count(&file, &config)?;
        let bias = format!("{CLASSIFIER_HEAD}bias");
        let classes = match file.shape(&bias).as_deref() {
            Some(&[classes]) if classes > 0 => classes,
            other => {
                return Err(bad(format!(
                    "tensor {bias} has shape {other:?}, expected [classes]"
                )))
            }
        };
        let pooling = match metadata.get(POOLING_KEY) {
            None => Pooling::Mean,
            Some(name) => Pooling::from_name(name)
                .ok_or_else(|| bad(format!("unknown `{POOLING_KEY}` {name:?}")))?,
        };
        let model = Self::new(Bert::new(device, config, 0)?, classes, 0)?.with_pooling(pooling);
        load_hf_layout(&file, &model.named_parameters(), &[])?;
        Ok((model, metadata))
    }
}

/// Fails unless `file` holds exactly `config.num_hidden_layers` encoder
/// blocks (`[bert.]encoder.layer.N.*`).
fn check_layer_count(file: &Checkpoint, config: &BertConfig) -> Result<(), ModelError> {
    let blocks = file
        .names()
        .iter()
        .filter_map(|name| {
            let rest = name.strip_prefix("bert.").unwrap_or(name);
            let index = rest.strip_prefix("encoder.layer.")?.split('.').next()?;
            index.parse::<usize>().ok()
        })
        .max()
        .map_or(0, |last| last.saturating_add(1));
    if blocks != config.num_hidden_layers {
        return Err(ModelError::Checkpoint {
            path: file.path().to_path_buf(),
            reason: format!(
                "the config says num_hidden_layers {} but the weights hold {blocks} encoder \
                 blocks: the config does not belong to these weights",
                config.num_hidden_layers
            ),
        });
    }
    Ok(())
}

/// Prefix of the classification head's tensors in a saved classifier.
const CLASSIFIER_HEAD: &str = "head.";
/// Header keys of a saved classifier: what it holds, and the encoder's config.
const MODEL_KEY: &str = "kiln.model";
const CLASSIFIER_MODEL: &str = "bert-classifier";
const CONFIG_KEY: &str = "bert.config";
const POOLING_KEY: &str = "kiln.pooling";
