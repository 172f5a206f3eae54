//! all-MiniLM-L6-v2-sized BERT (6 layers, hidden 384, 12 heads) at 128 tokens:
//! inference tokens/s and full fine-tuning samples/s (every layer trainable,
//! AdamW), with PyTorch CPU measured on the same architecture in the same run
//! when installed. Weights are random: speed does not depend on them.
//!
//! ```text
//! cargo bench --bench bert
//! ```

mod support;

use kiln::graph::optim::{Adam, Optimizer};
use kiln::graph::{loss, NoGradGuard};
use kiln::models::bert::{Bert, BertClassifier, BertConfig, BertInput};
use kiln::models::Mode;
use std::time::Instant;

const TOKENS: usize = 128;
const INFER_BATCH: usize = 16;
const TRAIN_BATCH: usize = 8;

fn minilm() -> BertConfig {
    BertConfig {
        vocab_size: 30_522,
        hidden_size: 384,
        num_hidden_layers: 6,
        num_attention_heads: 12,
        intermediate_size: 1536,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
    }
}

fn batch(n: usize) -> (Vec<u32>, Vec<f32>) {
    let ids = (0..n * TOKENS)
        .map(|i| (1000 + (i * 7919) % 20_000) as u32)
        .collect();
    (ids, vec![1.0; n * TOKENS])
}

fn main() -> anyhow::Result<()> {
    let device = kiln::Device::new()?;
    let info = device.adapter_info();
    println!("adapter: {} ({:?})", info.name, info.backend);
    let model = BertClassifier::new(Bert::new(&device, minilm(), 0)?, 2, 1)?;

    let (ids, mask) = batch(INFER_BATCH);
    let input = BertInput {
        ids: &ids,
        mask: &mask,
        shape: [INFER_BATCH, TOKENS],
        token_types: None,
    };
    let infer = || -> anyhow::Result<()> {
        let _guard = NoGradGuard::new();
        model.bert.forward(&input, &mut Mode::eval())?.to_vec()?;
        Ok(())
    };
    infer()?;
    let reps = 3;
    let start = Instant::now();
    for _ in 0..reps {
        infer()?;
    }
    let tokens_per_s = (reps * INFER_BATCH * TOKENS) as f64 / start.elapsed().as_secs_f64();

    let (ids, mask) = batch(TRAIN_BATCH);
    let input = BertInput {
        ids: &ids,
        mask: &mask,
        shape: [TRAIN_BATCH, TOKENS],
        token_types: None,
    };
    let labels: Vec<u32> = (0..TRAIN_BATCH as u32).map(|i| i % 2).collect();
    let mut params = model.bert.parameters();
    params.extend(model.head_parameters());
    let mut opt = Adam::adamw(params, 5e-5, 0.01);
    let mut step = |seed: u32| -> anyhow::Result<()> {
        let logits = model.forward(&input, &mut Mode::training(seed))?;
        let l = loss::cross_entropy(&logits, &labels)?;
        opt.zero_grad();
        l.backward()?;
        opt.step()?;
        l.item()?;
        Ok(())
    };
    step(0)?;
    let steps = 3;
    let start = Instant::now();
    for s in 0..steps {
        step(s + 1)?;
    }
    let samples_per_s = (steps as usize * TRAIN_BATCH) as f64 / start.elapsed().as_secs_f64();
    if std::env::var_os("KILN_PROFILE").is_some() {
        device.set_profiling(true)?;
        step(99)?;
        println!("one training step, by kernel:");
        support::print_profile(&device.profile(), 25);
        device.set_profiling(false)?;
    }

    println!();
    println!("MiniLM-sized BERT, {TOKENS} tokens");
    println!(
        "{:<36} {:>12} {:>12} {:>8}",
        "", "kiln", "pytorch cpu", "ratio"
    );
    let torch = torch_reference();
    let row = |name: &str, ours: f64, theirs: Option<f64>| {
        let (t, r) = match theirs {
            Some(t) => (format!("{t:.1}"), format!("{:.2}", ours / t)),
            None => ("-".into(), "-".into()),
        };
        println!("{name:<36} {ours:>12.1} {t:>12} {r:>8}");
    };
    let (infer_ref, train_ref) = match &torch {
        Ok((i, t)) => (Some(*i), Some(*t)),
        Err(_) => (None, None),
    };
    row(
        &format!("inference tokens/s (batch {INFER_BATCH})"),
        tokens_per_s,
        infer_ref,
    );
    row(
        &format!("training samples/s (batch {TRAIN_BATCH})"),
        samples_per_s,
        train_ref,
    );
    if let Err(why) = torch {
        println!("(no PyTorch reference: {why})");
    }
    Ok(())
}

/// PyTorch's inference tokens/s and training samples/s for the same
/// architecture, written out with its own modules.
fn torch_reference() -> Result<(f64, f64), String> {
    let script = r#"
import math, os, time, torch
torch.set_num_threads(os.cpu_count())
F = torch.nn.functional
H, L, HEADS, I, V, T = 384, 6, 12, 1536, 30522, 128
class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.ModuleList([torch.nn.Linear(H, H) for _ in range(3)])
        self.o, self.n1 = torch.nn.Linear(H, H), torch.nn.LayerNorm(H, eps=1e-12)
        self.i, self.out, self.n2 = torch.nn.Linear(H, I), torch.nn.Linear(I, H), torch.nn.LayerNorm(H, eps=1e-12)
    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, HEADS, H // HEADS).transpose(1, 2) for m in self.qkv)
        p = F.dropout(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(H // HEADS), -1), 0.1, self.training)
        c = (p @ v).transpose(1, 2).reshape(b, t, H)
        x = self.n1(x + F.dropout(self.o(c), 0.1, self.training))
        return self.n2(x + F.dropout(self.out(F.gelu(self.i(x))), 0.1, self.training))
class Bert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.p, self.ty = torch.nn.Embedding(V, H), torch.nn.Embedding(512, H), torch.nn.Embedding(2, H)
        self.n = torch.nn.LayerNorm(H, eps=1e-12)
        self.blocks = torch.nn.ModuleList([Block() for _ in range(L)])
        self.head = torch.nn.Linear(H, 2)
    def forward(self, ids):
        x = self.w(ids) + self.p.weight[: ids.shape[1]] + self.ty.weight[0]
        x = F.dropout(self.n(x), 0.1, self.training)
        for blk in self.blocks:
            x = blk(x)
        return x
model = Bert()
ids = torch.randint(1000, 21000, (16, T))
model.eval()
with torch.no_grad():
    model(ids)
    start = time.perf_counter()
    for _ in range(3): model(ids)
print(3 * 16 * T / (time.perf_counter() - start))
model.train()
opt = torch.optim.AdamW(model.parameters(), 5e-5, weight_decay=0.01)
ids, y = ids[:8], torch.arange(8) % 2
def step():
    opt.zero_grad(); F.cross_entropy(model.head(model(ids).mean(1)), y).backward(); opt.step()
step()
start = time.perf_counter()
for _ in range(3): step()
print(3 * 8 / (time.perf_counter() - start))
"#;
    let values = support::numbers(support::run_python("torch", script, &[])?)?;
    match values[..] {
        [infer, train] => Ok((infer, train)),
        _ => Err(format!("expected 2 numbers from PyTorch, got {values:?}")),
    }
}
