//! all-MiniLM-L6-v2-sized BERT (6 layers, hidden 384, 12 heads) at 128 tokens:
//! inference tokens/s and full fine-tuning samples/s (every layer trainable,
//! AdamW), against PyTorch CPU running the same architecture written with its
//! own modules. Weights are random: speed does not depend on them.

use crate::support::{self, Row};
use kiln::graph::optim::{Adam, Optimizer};
use kiln::graph::{loss, NoGradGuard};
use kiln::models::bert::{Bert, BertClassifier, BertConfig, BertInput};
use kiln::models::Mode;
use kiln::Device;

const TOKENS: usize = 128;
const INFER_BATCH: usize = 16;
const TRAIN_BATCH: usize = 8;
/// Timed windows, alternating with PyTorch's.
const WINDOWS: usize = 2;

fn minilm() -> BertConfig {
    BertConfig {
        hidden_size: 384,
        num_hidden_layers: 6,
        intermediate_size: 1536,
        ..BertConfig::default()
    }
}

fn batch(n: usize) -> (Vec<u32>, Vec<f32>) {
    let ids = (0..n * TOKENS)
        .map(|i| (1000 + (i * 7919) % 20_000) as u32)
        .collect();
    (ids, vec![1.0; n * TOKENS])
}

pub fn run(device: &Device) -> anyhow::Result<Vec<Row>> {
    let model = BertClassifier::new(Bert::new(device, minilm(), 0)?, 2, 1)?;

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
    // Twice: products of a new shape are tuned as the first pass's blocks
    // end (where large products are tuned by shape), and the second
    // compiles the kernels of the tilings chosen, out of the windows.
    infer()?;
    infer()?;
    // Windows alternate with PyTorch's; the best of each counts.
    let mut torch = support::Reference::start("torch", TORCH_BERT);
    let reps = 3;
    let ((tokens_per_s, infer_counts), torch_infer) = support::alternate(
        WINDOWS,
        || {
            let (seconds, counts) = support::measure_steps(device, reps, |_| infer())?;
            Ok(((reps * INFER_BATCH * TOKENS) as f64 / seconds, counts))
        },
        &mut torch,
        "infer",
    )?;
    super::maybe_profile(device, "MiniLM inference", infer)?;

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
    // Launched together, as `fit` does (see `Device::together`).
    let mut step = |seed: u32| {
        device.together(|| -> anyhow::Result<()> {
            let logits = model.forward(&input, &mut Mode::training(seed))?;
            let l = loss::cross_entropy(&logits, &labels)?;
            opt.zero_grad();
            l.backward()?;
            opt.step()?;
            l.item()?;
            Ok(())
        })
    };
    // Twice, as for inference above.
    step(0)?;
    step(0)?;
    let steps = 3;
    let mut seed = 0;
    let ((samples_per_s, train_counts), torch_train) = support::alternate(
        WINDOWS,
        || {
            let (seconds, counts) = support::measure_steps(device, steps, |_| {
                seed += 1;
                step(seed)
            })?;
            Ok(((steps * TRAIN_BATCH) as f64 / seconds, counts))
        },
        &mut torch,
        "train",
    )?;
    super::maybe_profile(device, "MiniLM training step", || step(99))?;
    Ok(vec![
        Row::new(
            format!("MiniLM-sized BERT inference, {INFER_BATCH} x {TOKENS} tokens"),
            "tokens/s",
            tokens_per_s,
        )
        .against(support::torch_name(), torch_infer.as_ref().copied())
        .per_step(infer_counts),
        Row::new(
            format!("MiniLM-sized BERT full fine-tuning, {TRAIN_BATCH} x {TOKENS}"),
            "samples/s",
            samples_per_s,
        )
        .against(support::torch_name(), torch_train.as_ref().copied())
        .per_step(train_counts),
    ])
}

/// The same architecture in PyTorch, written with its own modules. Requests:
/// `infer` answers inference tokens/s, `train` training samples/s.
const TORCH_BERT: &str = r#"
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
model = Bert().to(DEV)
ids = torch.randint(1000, 21000, (16, T), device=DEV)
opt = torch.optim.AdamW(model.parameters(), 5e-5, weight_decay=0.01)
y = torch.arange(8, device=DEV) % 2
def infer():
    model.eval()
    with torch.no_grad():
        model(ids)
def step():
    model.train()
    opt.zero_grad(); F.cross_entropy(model.head(model(ids[:8]).mean(1)), y).backward(); opt.step()
infer(); step()
# A GPU takes milliseconds a step: more of them for a steady figure.
R = 30 if DEV.type == "cuda" else 3
def measure(request):
    sync(); start = time.perf_counter()
    if request == "infer":
        for _ in range(R): infer()
        sync(); return R * 16 * T / (time.perf_counter() - start)
    for _ in range(R): step()
    sync(); return R * 8 / (time.perf_counter() - start)
"#;
