//! Training throughput of the Keras IMDB classifier (Embedding(10000, 32) ->
//! LSTM(64) -> Dense(64, relu) -> Dense(2), Adam) at batch 32 and 200 steps,
//! against PyTorch CPU with packed sequences (the same masking) and, for
//! reference, over the padded batch without masking.

use crate::support::{self, Row};
use kiln::zoo::{Architecture, TEXT_LENGTH, TEXT_VOCAB};
use kiln::Device;

const BATCH: usize = 32;
const STEPS: usize = 10;
const WINDOWS: usize = 3;

pub fn run(device: &Device) -> anyhow::Result<Vec<Row>> {
    let mut trainer = super::adam_trainer(device, Architecture::Lstm)?;
    // Reviews of varied length: 60..200 real tokens, then padding.
    let ids: Vec<f32> = (0..BATCH * TEXT_LENGTH)
        .map(|i| {
            let (row, col) = (i / TEXT_LENGTH, i % TEXT_LENGTH);
            if col < 60 + row * 140 / BATCH {
                (2 + (i * 7919) % (TEXT_VOCAB - 2)) as f32
            } else {
                0.0
            }
        })
        .collect();
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % 2).collect();
    let mut step = || super::training_step(&mut trainer, (&ids, TEXT_LENGTH), &labels, false);
    for _ in 0..2 {
        step()?;
    }
    // Windows alternate with PyTorch's (packed, then padded); the best counts.
    let mut torch = support::Reference::start("torch", TORCH_LSTM);
    let ((rate, counts), packed) = support::alternate(
        WINDOWS,
        || {
            let (seconds, counts) = support::measure_steps(device, STEPS, |_| step())?;
            Ok(((STEPS * BATCH) as f64 / seconds, counts))
        },
        &mut torch,
        "packed",
    )?;
    let padded = match torch.as_mut() {
        Ok(t) => (0..WINDOWS).try_fold(0.0f64, |best, _| Ok(best.max(t.measure("padded")?))),
        Err(why) => Err(why.clone()),
    };
    super::maybe_profile(device, "LSTM training step", step)?;
    Ok(vec![
        Row::new(
            format!("IMDB LSTM training, {BATCH} x {TEXT_LENGTH}, masked"),
            "samples/s",
            rate,
        )
        .against("pytorch packed", packed.as_ref().copied())
        .per_step(counts),
        Row::new("  same, against PyTorch unmasked", "samples/s", rate)
            .against("pytorch padded", padded.as_ref().copied()),
    ])
}

/// The same model in PyTorch. Requests: `packed` answers its samples/s with
/// packed sequences (its way of masking padding, the same computation as
/// ours), `padded` over the padded batch without masking, for reference.
const TORCH_LSTM: &str = r#"
import os, time, torch
torch.set_num_threads(os.cpu_count())
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10000, 32, padding_idx=0)
        self.lstm = torch.nn.LSTM(32, 64, batch_first=True)
        self.head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    def forward(self, ids, lengths, packed):
        x = self.embed(ids)
        if packed:
            x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(x)
        return self.head(h[-1])
model = Model().to(DEV)
opt = torch.optim.Adam(model.parameters(), 1e-3)
# The lengths stay on the CPU, where pack_padded_sequence wants them.
lengths = torch.tensor([60 + row * 140 // 32 for row in range(32)])
ids = (torch.randint(2, 10000, (32, 200)) * (torch.arange(200)[None, :] < lengths[:, None])).to(DEV)
y = (torch.arange(32) % 2).to(DEV)
def step(packed):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(ids, lengths, packed), y).backward()
    opt.step()
for _ in range(3): step(True); step(False)
def measure(request):
    packed = request == "packed"
    sync(); start = time.perf_counter()
    for _ in range(20): step(packed)
    sync(); return 20 * 32 / (time.perf_counter() - start)
"#;
