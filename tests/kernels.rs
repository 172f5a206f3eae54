//! Every kernel against a plain f64 CPU reference on seeded random inputs, odd
//! shapes included. Tolerances: matmul and sums within 1e-4 of the sum of the
//! absolute terms (the dot-product error bound); elementwise ops within
//! 1e-4 relative + 1e-6 absolute; max/min exact.

mod common;

use common::{assert_close, assert_close_scaled, broadcast_reference, device, erf, random_vec};
use kiln::device::{
    half::f16, BinaryOp, DType, DeviceError, Elementwise, EpilogueOperand, HalfLoads, Matmul,
    MatmulTiling, Operand, Reduce, ReduceOp, ReduceStrategy, Tuning, UnaryOp,
};

// ----- matmul ----------------------------------------------------------------

/// The tilings the every-tiling tests check. By default (`KILN_TEST_TILINGS`
/// unset or `all`) that is every tiling the tuner may pick, plus odd ones
/// that stress edge handling; the ones this adapter cannot run (e.g. subgroup
/// tilings on GL) are left out. With `KILN_TEST_TILINGS=families` it is the
/// ones this adapter's tuner may pick and one tiling of each other kernel
/// family: for CI's passes that vary only what every tiling of a family
/// shares (the backend's shader translation, how parameters travel), after a
/// pass that checked every tiling. Compiling each tiling's kernels is most of
/// those passes' time on a CPU adapter. A comma-separated list of tilings
/// (`KILN_TEST_TILINGS=shared:128x64x16:8x8:vec4,...`) checks just those:
/// block shapes a benchmark sweep found, before they join the candidates.
fn tilings() -> Vec<MatmulTiling> {
    let all = every_tiling();
    match std::env::var("KILN_TEST_TILINGS").as_deref() {
        Err(_) | Ok("all") => all,
        Ok("families") => {
            let d = device();
            let tuning = d.tuning();
            let mut picks = vec![tuning.matmul, tuning.small_matmul];
            picks.extend(Tuning::candidates(
                d.adapter_info(),
                d.features(),
                d.limits(),
            ));
            let mut chosen: Vec<MatmulTiling> = Vec::new();
            for tiling in all {
                let new_family = !chosen.iter().any(|c| family(*c) == family(tiling));
                if picks.contains(&tiling) || new_family {
                    chosen.push(tiling);
                }
            }
            eprintln!("KILN_TEST_TILINGS=families: checking {chosen:?}");
            chosen
        }
        Ok(list) => list
            .split(',')
            .map(|t| {
                let tiling: MatmulTiling = t.trim().parse().unwrap_or_else(|e| {
                    panic!(
                        "KILN_TEST_TILINGS: {e}; expected `all`, `families` or a list of tilings"
                    )
                });
                let d = device();
                if let Err(why) = tiling.validate(d.limits(), d.features(), d.adapter_info()) {
                    panic!("KILN_TEST_TILINGS: this adapter cannot run {why}");
                }
                tiling
            })
            .collect(),
    }
}

/// A tiling's kernel family: tilings of one family share their kernel's
/// code and differ only in its constants and unrolled sizes.
fn family(tiling: MatmulTiling) -> (&'static str, bool, bool) {
    match tiling {
        MatmulTiling::Register { .. } => ("register", false, false),
        MatmulTiling::Subgroup { .. } => ("subgroup", false, false),
        MatmulTiling::Shared {
            vec4, pipelined, ..
        } => ("shared", vec4, pipelined),
    }
}

/// Every tiling the tuner may pick, plus odd ones that stress edge handling,
/// less those this adapter cannot run.
fn every_tiling() -> Vec<MatmulTiling> {
    let d = device();
    // The tiling every product on this device takes must be one it runs.
    let own = d.tuning().matmul;
    if let Err(why) = own.validate(d.limits(), d.features(), d.adapter_info()) {
        panic!("the device's own tiling {own} is invalid here: {why}");
    }
    let mut t = vec![own, Tuning::CPU.matmul, Tuning::GPU.matmul];
    t.extend(Tuning::candidates(
        d.adapter_info(),
        d.features(),
        d.limits(),
    ));
    for s in [
        "register:4x4:16x16",
        "subgroup:4:8:64",
        "subgroup:2:8:32",
        "shared:32x32x8:2x2",
        "shared:32x32x8:4x4:vec4",
        "shared:16x32x4:4x8:vec4",
        "shared:32x32x8:4x4:vec4:pipelined",
        // More vec4 loads per tile than invocations: 4 of A and 8 of B each.
        "shared:32x64x16:8x8:vec4:pipelined",
        // Tiles that do not divide among the invocations: 64 of them for
        // 32 vec4s of A; 48 for 128 of B (a third fetch for some only).
        "shared:16x64x8:4x4:vec4:pipelined",
        "shared:24x32x16:4x4:vec4:pipelined",
    ] {
        t.push(s.parse().unwrap());
    }
    t.retain(
        |t| match t.validate(d.limits(), d.features(), d.adapter_info()) {
            Ok(()) => true,
            Err(why) => {
                // Said, so that a run on this adapter does not pass for one that
                // checked every tiling.
                eprintln!("tiling {t} not checked on this adapter: {why}");
                false
            }
        },
    );
    let mut unique = Vec::new();
    for tiling in t {
        if !unique.contains(&tiling) {
            unique.push(tiling);
        }
    }
    unique
}

/// f64 reference of `C[z] = op(A[z]) op(B[z])` and the per-element error scale.
fn matmul_reference(a: &[f32], b: &[f32], s: &Matmul) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0; s.batch * s.m * s.n];
    let mut scale = vec![0.0; s.batch * s.m * s.n];
    for z in 0..s.batch {
        for i in 0..s.m {
            for j in 0..s.n {
                let (mut acc, mut abs) = (0.0f64, 0.0f64);
                for kk in 0..s.k {
                    let av = if s.trans_a {
                        a[z * s.batch_stride_a + kk * s.m + i]
                    } else {
                        a[z * s.batch_stride_a + i * s.k + kk]
                    };
                    let bv = if s.trans_b {
                        b[z * s.batch_stride_b + j * s.k + kk]
                    } else {
                        b[z * s.batch_stride_b + kk * s.n + j]
                    };
                    let term = f64::from(av) * f64::from(bv);
                    acc += term;
                    abs += term.abs();
                }
                c[(z * s.m + i) * s.n + j] = acc;
                scale[(z * s.m + i) * s.n + j] = abs;
            }
        }
    }
    (c, scale)
}

fn check_matmul(spec: Matmul, tiling: MatmulTiling, seed: u64) {
    check_matmul_on(device(), spec, tiling, seed);
}

fn check_matmul_on(d: &kiln::Device, spec: Matmul, tiling: MatmulTiling, seed: u64) {
    let a_len = (spec.batch - 1) * spec.batch_stride_a + spec.m * spec.k;
    let b_len = (spec.batch - 1) * spec.batch_stride_b + spec.k * spec.n;
    let a = random_vec(a_len, seed, -1.0, 1.0);
    let b = random_vec(b_len, seed + 1, -1.0, 1.0);
    let ga = d.upload(&a).unwrap();
    let gb = d.upload(&b).unwrap();
    let gc = d.matmul_with(&ga, &gb, &spec, tiling).unwrap();
    let got = d.read::<f32>(&gc).unwrap();
    let (want, scale) = matmul_reference(&a, &b, &spec);
    assert_close_scaled(&format!("{tiling} {spec:?}"), &got, &want, &scale, 1e-4);
}

#[test]
fn matmul_matches_reference_for_odd_shapes_every_tiling_and_transpose() {
    let shapes = [
        (1, 1, 1),
        (1, 7, 1),
        (7, 1, 3),
        (33, 65, 17),
        (64, 64, 64),
        (17, 130, 129),
    ];
    for (t_idx, tiling) in tilings().into_iter().enumerate() {
        for (s_idx, &(m, n, k)) in shapes.iter().enumerate() {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let spec = Matmul::new(m, n, k).transpose_a(ta).transpose_b(tb);
                check_matmul(spec, tiling, (t_idx * 100 + s_idx * 4) as u64);
            }
        }
    }
}

#[test]
fn matmul_splits_row_blocks_past_the_grid_limit() {
    // More row blocks than one grid dimension holds (65535 on every adapter
    // here), with tilings of small blocks so the operands stay small: the
    // rows go in several dispatches, each starting where the last stopped.
    let d = device();
    let max = d.limits().max_compute_workgroups_per_dimension as usize;
    for (tiling, n, k) in [
        ("register:4x4:1x1", 4, 3),
        ("shared:16x16x4:4x4", 16, 4),
        ("subgroup:1:8:8", 32, 4),
    ] {
        let tiling: MatmulTiling = tiling.parse().unwrap();
        if let Err(why) = tiling.validate(d.limits(), d.features(), d.adapter_info()) {
            eprintln!("matmul_splits_row_blocks: {tiling} not checked here: {why}");
            continue;
        }
        let (block_m, _) = tiling.block();
        let m = max * block_m as usize + 3;
        check_matmul_on(d, Matmul::new(m, n, k), tiling, 77);
    }
}

#[test]
fn batched_matmul_with_strides_and_broadcast() {
    for tiling in tilings() {
        for (ta, tb) in [(false, false), (true, true), (false, true)] {
            for (m, n, k) in [(33, 65, 17), (36, 20, 44)] {
                let spec = Matmul::batched(3, m, n, k).transpose_a(ta).transpose_b(tb);
                check_matmul(spec, tiling, 7);
                // B shared by every batch (stride 0), as in x @ W for a 3-D x.
                let shared_b = Matmul {
                    batch_stride_b: 0,
                    ..spec
                };
                check_matmul(shared_b, tiling, 8);
            }
        }
    }
}

#[test]
fn long_k_weight_gradients_split_k_and_still_match() {
    // A^T B with few outputs and a long k: split into chunks summed
    // afterwards. The last shape splits only under the GPU kernel class
    // (output blocks too few to fill a GPU, outputs too many for the CPU
    // adapters' rule).
    for tiling in tilings() {
        for (m, n, k) in [
            (32, 9, 4096),
            (20, 36, 2560),
            (8, 8, 21632),
            (192, 160, 1024),
        ] {
            check_matmul(Matmul::new(m, n, k).transpose_a(true), tiling, 21);
        }
    }
}

#[test]
fn gpus_give_products_with_few_output_blocks_the_small_products_tiling() {
    // Own device: its tuning and profile are changed here.
    let d = kiln::Device::new().unwrap();
    let tiling = |s: &str| s.parse::<MatmulTiling>().unwrap();
    let (large, small) = (
        tiling("shared:64x64x16:4x4:vec4"),
        tiling("shared:32x32x8:4x4:vec4"),
    );
    d.set_tuning(Tuning {
        matmul: large,
        small_matmul: small,
        operand_textures: false,
    });
    // 1024 x 1024 outputs are 256 blocks of 64 x 64, enough to fill a GPU;
    // 64 x 64 is one block.
    let ran = |m: usize, n: usize| -> String {
        let spec = Matmul::new(m, n, 4);
        let a = d.upload(&random_vec(m * 4, 8, -1.0, 1.0)).unwrap();
        let b = d.upload(&random_vec(4 * n, 9, -1.0, 1.0)).unwrap();
        d.set_profiling(true).unwrap();
        let product = d.matmul(&a, &b, &spec).unwrap();
        d.synchronize().unwrap();
        let profile = d.profile();
        d.set_profiling(false).unwrap();
        drop(product);
        assert_eq!(profile.len(), 1, "{profile:?}");
        profile[0].kernel.clone()
    };
    let took = |key: &str, t: MatmulTiling| key.starts_with(&format!("{t}:false"));
    assert!(took(&ran(1024, 1024), large));
    let few = ran(64, 64);
    match d.kernels_for_cpu() {
        false => assert!(took(&few, small), "{few}"),
        true => assert!(took(&few, large), "{few}"),
    }
}

#[test]
fn weight_gradients_split_where_output_blocks_would_leave_a_gpu_idle() {
    // A transformer layer's weight gradient over 1024 tokens: on a GPU its
    // few output blocks each walk k alone unless k is split (a second
    // dispatch sums the chunks); CPU adapters' cores are few enough that it
    // stays one product. Own device: the dispatch count is per device, and
    // tuning by shape (which CPU adapters do for products of this size)
    // would add the candidates' timed runs to it.
    let d = kiln::Device::new().unwrap();
    d.set_shape_tuning(None);
    let spec = Matmul::new(192, 160, 1024).transpose_a(true);
    let a = d.upload(&random_vec(1024 * 192, 5, -1.0, 1.0)).unwrap();
    let b = d.upload(&random_vec(1024 * 160, 6, -1.0, 1.0)).unwrap();
    d.synchronize().unwrap();
    let before = d.dispatch_stats().dispatches;
    let product = d.matmul(&a, &b, &spec).unwrap();
    d.synchronize().unwrap();
    let dispatches = d.dispatch_stats().dispatches - before;
    assert_eq!(dispatches, if d.kernels_for_cpu() { 1 } else { 2 });
    assert_eq!(product.len(), 192 * 160);
}

#[test]
fn fused_bias_and_activation_epilogues_match_reference_every_tiling() {
    let d = device();
    // (epilogue, reference of (product + bias)); the leaky ReLU reads a scalar,
    // GELU a shared helper.
    let leaky = |v: f64| if v > 0.0 { v } else { 0.1 * v };
    let gelu = |v: f64| 0.5 * v * (1.0 + erf(v / 2f64.sqrt()));
    let epilogues: [(Elementwise, &dyn Fn(f64) -> f64); 2] = [
        (
            Elementwise::new(
                "bias_leaky",
                "select(s0 * (x0 + x1), x0 + x1, x0 + x1 > 0.0)",
            )
            .scalars(&[0.1]),
            &leaky,
        ),
        (Elementwise::new("bias_gelu", "kiln_gelu(x0 + x1)"), &gelu),
    ];
    // Every tiling with one epilogue on a plain and a transposed, batched
    // layout; the tuned tiling with both on odd and vec4-friendly shapes, a
    // split-k product and an empty k (the last two take the epilogue as a
    // second pass). Each combination is a kernel to compile, which on a CPU
    // adapter takes seconds.
    let mut cases: Vec<(MatmulTiling, Matmul, &Elementwise)> = Vec::new();
    for tiling in tilings() {
        for spec in [
            Matmul::new(33, 65, 17),
            Matmul::batched(2, 36, 20, 44).transpose_a(true),
        ] {
            cases.push((tiling, spec, &epilogues[0].0));
        }
    }
    for spec in [
        Matmul::new(1, 7, 1),
        Matmul::new(64, 64, 64).transpose_b(true),
        Matmul::new(32, 9, 4096).transpose_a(true),
        Matmul::new(5, 3, 0),
    ] {
        for (op, _) in &epilogues {
            cases.push((d.tuning().matmul, spec, op));
        }
    }
    for (seed, (tiling, spec, op)) in cases.into_iter().enumerate() {
        let seed = seed as u64 * 3;
        let a = random_vec(spec.batch * spec.m * spec.k, seed, -1.0, 1.0);
        let b = random_vec(spec.batch * spec.k * spec.n, seed + 1, -1.0, 1.0);
        let bias = random_vec(spec.n, seed + 2, -1.0, 1.0);
        let (product, terms) = matmul_reference(&a, &b, &spec);
        let (ga, gb, gbias) = (
            d.upload(&a).unwrap(),
            d.upload(&b).unwrap(),
            d.upload(&bias).unwrap(),
        );
        let epilogue = kiln::device::Epilogue {
            op: op.clone(),
            operand: EpilogueOperand::Column(&gbias),
        };
        let got = d
            .read::<f32>(
                &d.matmul_fused_with(&ga, &gb, &spec, &epilogue, tiling)
                    .unwrap(),
            )
            .unwrap();
        let reference = epilogues.iter().find(|(e, _)| e.name == op.name).unwrap().1;
        let column = |i: usize| f64::from(bias[i % spec.n]);
        let want: Vec<f64> = (0..product.len())
            .map(|i| reference(product[i] + column(i)))
            .collect();
        // The activations change errors by at most a factor of 1.13.
        let scale: Vec<f64> = (0..product.len())
            .map(|i| 1.2 * (terms[i] + column(i).abs()) + 1e-2)
            .collect();
        let what = format!("{} {tiling} {spec:?}", op.name);
        assert_close_scaled(&what, &got, &want, &scale, 1e-4);
    }
    // f16 operands (a dense layer under autocast): the epilogue sees the same
    // f32 product.
    let spec = Matmul::new(40, 24, 36);
    let half = |v: Vec<f32>| -> Vec<f32> { v.iter().map(|&x| f16::from_f32(x).to_f32()).collect() };
    let a = half(random_vec(spec.m * spec.k, 91, -1.0, 1.0));
    let b = half(random_vec(spec.k * spec.n, 92, -1.0, 1.0));
    let bias = random_vec(spec.n, 93, -1.0, 1.0);
    let to_f16 = |v: &[f32]| d.cast(&d.upload(v).unwrap(), DType::F16).unwrap();
    let gbias = d.upload(&bias).unwrap();
    let epilogue = kiln::device::Epilogue {
        op: epilogues[1].0.clone(),
        operand: EpilogueOperand::Column(&gbias),
    };
    let got = d
        .read::<f32>(
            &d.matmul_fused(&to_f16(&a), &to_f16(&b), &spec, &epilogue)
                .unwrap(),
        )
        .unwrap();
    let (product, terms) = matmul_reference(&a, &b, &spec);
    let want: Vec<f64> = (0..product.len())
        .map(|i| gelu(product[i] + f64::from(bias[i % spec.n])))
        .collect();
    let scale: Vec<f64> = (0..product.len())
        .map(|i| 1.2 * (terms[i] + f64::from(bias[i % spec.n]).abs()) + 1e-2)
        .collect();
    assert_close_scaled("gelu epilogue, f16 operands", &got, &want, &scale, 1e-4);
    // The bias must be one f32 per column.
    let (ga, gb) = (
        d.upload(&[1.0f32; 6]).unwrap(),
        d.upload(&[1.0f32; 9]).unwrap(),
    );
    let short = d.upload(&[1.0f32; 2]).unwrap();
    let epilogue = kiln::device::Epilogue {
        op: Elementwise::new("bias", "x0 + x1"),
        operand: EpilogueOperand::Column(&short),
    };
    let err = d
        .matmul_fused(&ga, &gb, &Matmul::new(2, 3, 3), &epilogue)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("operand holds 2 values for 3 columns"),
        "{err}"
    );
}

#[test]
fn per_element_epilogues_match_reference_every_tiling() {
    // An operand laid out like C (an activation's output, whose derivative a
    // backward product applies to the input gradient it stores): every
    // tiling on a plain and a batched transposed-B layout, then the tuned
    // tiling on a split-k product and an empty k (second-pass epilogues).
    let d = device();
    let op = Elementwise::new("sigmoid_grad", "x0 * x1 * (s0 - x1)").scalars(&[1.0]);
    let mut cases: Vec<(MatmulTiling, Matmul)> = Vec::new();
    for tiling in tilings() {
        for spec in [
            Matmul::new(33, 65, 17),
            Matmul::batched(2, 36, 20, 44).transpose_b(true),
        ] {
            cases.push((tiling, spec));
        }
    }
    for spec in [
        Matmul::new(32, 9, 4096).transpose_a(true),
        Matmul::new(5, 3, 0),
    ] {
        cases.push((d.tuning().matmul, spec));
    }
    for (seed, (tiling, spec)) in cases.into_iter().enumerate() {
        let seed = 700 + seed as u64 * 3;
        let a = random_vec(spec.batch * spec.m * spec.k, seed, -1.0, 1.0);
        let b = random_vec(spec.batch * spec.k * spec.n, seed + 1, -1.0, 1.0);
        let y = random_vec(spec.batch * spec.m * spec.n, seed + 2, 0.0, 1.0);
        let (product, terms) = matmul_reference(&a, &b, &spec);
        let (ga, gb, gy) = (
            d.upload(&a).unwrap(),
            d.upload(&b).unwrap(),
            d.upload(&y).unwrap(),
        );
        let epilogue = kiln::device::Epilogue {
            op: op.clone(),
            operand: EpilogueOperand::Element(&gy),
        };
        let got = d
            .read::<f32>(
                &d.matmul_fused_with(&ga, &gb, &spec, &epilogue, tiling)
                    .unwrap(),
            )
            .unwrap();
        let factor = |i: usize| f64::from(y[i]) * (1.0 - f64::from(y[i]));
        let want: Vec<f64> = (0..product.len()).map(|i| product[i] * factor(i)).collect();
        let scale: Vec<f64> = (0..product.len())
            .map(|i| terms[i] * factor(i) + 1e-3)
            .collect();
        let what = format!("element epilogue {tiling} {spec:?}");
        assert_close_scaled(&what, &got, &want, &scale, 1e-4);
    }
    // The operand must hold one value per element of C.
    let (ga, gb, short) = (
        d.upload(&[1.0f32; 6]).unwrap(),
        d.upload(&[1.0f32; 9]).unwrap(),
        d.upload(&[1.0f32; 5]).unwrap(),
    );
    let epilogue = kiln::device::Epilogue {
        op: op.clone(),
        operand: EpilogueOperand::Element(&short),
    };
    let err = d
        .matmul_fused(&ga, &gb, &Matmul::new(2, 3, 3), &epilogue)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("operand holds 5 values for a 2 x 3 product"),
        "{err}"
    );
}

#[test]
fn planar_stores_match_reference_every_tiling() {
    // C stored as [m / plane, n, plane] (a convolution's output as NCHW
    // planes), through a per-column bias and ReLU, and through an element
    // operand read in the same layout: every tiling on a plain and a
    // transposed-B product, the tuned tiling on split-k and empty-k products
    // (reordered in a second pass).
    let d = device();
    let relu = Elementwise::new("bias_relu", "max(x0 + x1, 0.0)");
    let scale = Elementwise::new("scale", "x0 * x1");
    let mut cases: Vec<(MatmulTiling, Matmul, usize)> = Vec::new();
    for tiling in tilings() {
        cases.push((tiling, Matmul::new(36, 20, 44), 9));
        cases.push((tiling, Matmul::new(33, 12, 17).transpose_b(true), 11));
    }
    cases.push((
        d.tuning().matmul,
        Matmul::new(32, 9, 4096).transpose_a(true),
        8,
    ));
    cases.push((d.tuning().matmul, Matmul::new(6, 3, 0), 2));
    for (seed, (tiling, spec, plane)) in cases.into_iter().enumerate() {
        let seed = 800 + seed as u64 * 4;
        let a = random_vec(spec.m * spec.k, seed, -1.0, 1.0);
        let b = random_vec(spec.k * spec.n, seed + 1, -1.0, 1.0);
        let bias = random_vec(spec.n, seed + 2, -1.0, 1.0);
        let other = random_vec(spec.m * spec.n, seed + 3, -1.0, 1.0);
        let (product, terms) = matmul_reference(&a, &b, &spec);
        let (ga, gb) = (d.upload(&a).unwrap(), d.upload(&b).unwrap());
        let (gbias, gother) = (d.upload(&bias).unwrap(), d.upload(&other).unwrap());
        // Element (r, j) of the row-major product lands here.
        let planar = |r: usize, j: usize| (r / plane * spec.n + j) * plane + r % plane;
        for (op, operand) in [
            (&relu, EpilogueOperand::Column(&gbias)),
            (&scale, EpilogueOperand::Element(&gother)),
        ] {
            let epilogue = kiln::device::Epilogue {
                op: op.clone(),
                operand,
            };
            let got = d
                .read::<f32>(
                    &d.matmul_fused_planar_with(&ga, &gb, &spec, &epilogue, plane, tiling)
                        .unwrap(),
                )
                .unwrap();
            let mut want = vec![0.0; product.len()];
            let mut tolerance = vec![0.0; product.len()];
            for r in 0..spec.m {
                for (j, &column_bias) in bias.iter().enumerate() {
                    let (i, at) = (r * spec.n + j, planar(r, j));
                    let (value, size) = match operand {
                        EpilogueOperand::Column(_) => {
                            let b = f64::from(column_bias);
                            ((product[i] + b).max(0.0), terms[i] + b.abs())
                        }
                        EpilogueOperand::Element(_) => {
                            let o = f64::from(other[at]);
                            (product[i] * o, terms[i] * o.abs())
                        }
                    };
                    want[at] = value;
                    tolerance[at] = size + 1e-3;
                }
            }
            let what = format!("{} planes of {plane} {tiling} {spec:?}", op.name);
            assert_close_scaled(&what, &got, &want, &tolerance, 1e-4);
        }
    }
    // Planes must divide m.
    let (ga, gb, gbias) = (
        d.upload(&[1.0f32; 6]).unwrap(),
        d.upload(&[1.0f32; 9]).unwrap(),
        d.upload(&[1.0f32; 3]).unwrap(),
    );
    let epilogue = kiln::device::Epilogue {
        op: relu.clone(),
        operand: EpilogueOperand::Column(&gbias),
    };
    let err = d
        .matmul_fused_planar(&ga, &gb, &Matmul::new(2, 3, 3), &epilogue, 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("planes of 4 rows"), "{err}");
}

/// Shapes the column-sum checks take: plain, transposed-B, the MLP's first
/// weight gradient (A^T G) and odd shapes with scalar loads.
const COLUMN_SUM_SHAPES: [(usize, usize, usize, bool, bool); 4] = [
    (784, 64, 32, true, false),
    (33, 65, 17, false, false),
    (36, 20, 44, false, true),
    (40, 24, 36, true, false),
];

/// The product and, where the kernel adds them up as it goes, the sums of
/// op(B)'s columns over k, against f64 references.
fn check_column_sums_on(d: &kiln::Device, spec: Matmul, tiling: MatmulTiling, seed: u64) {
    let a = random_vec(spec.m * spec.k, seed, -1.0, 1.0);
    let b = random_vec(spec.k * spec.n, seed + 1, -1.0, 1.0);
    let (ga, gb) = (d.upload(&a).unwrap(), d.upload(&b).unwrap());
    let (c, sums) = d.matmul_column_sums_with(&ga, &gb, &spec, tiling).unwrap();
    let what = format!("{tiling} {spec:?}");
    let (want, scale) = matmul_reference(&a, &b, &spec);
    assert_close_scaled(&what, &d.read::<f32>(&c).unwrap(), &want, &scale, 1e-4);
    let Some(sums) = sums else {
        // Only the shared-memory kernel has no block for the sums.
        assert!(tiling.to_string().starts_with("shared"), "{what}: no sums");
        return;
    };
    let b_at = |kk: usize, j: usize| {
        f64::from(if spec.trans_b {
            b[j * spec.k + kk]
        } else {
            b[kk * spec.n + j]
        })
    };
    let want: Vec<f64> = (0..spec.n)
        .map(|j| (0..spec.k).map(|kk| b_at(kk, j)).sum())
        .collect();
    let scale: Vec<f64> = (0..spec.n)
        .map(|j| (0..spec.k).map(|kk| b_at(kk, j).abs()).sum())
        .collect();
    let got = d.read::<f32>(&sums).unwrap();
    assert_close_scaled(&format!("{what} column sums"), &got, &want, &scale, 1e-5);
}

#[test]
fn column_sums_of_b_come_with_the_product_on_every_tiling() {
    // A dense layer's bias gradient with its weight gradient.
    let d = device();
    for (t, tiling) in tilings().into_iter().enumerate() {
        for (s, &(m, n, k, ta, tb)) in COLUMN_SUM_SHAPES.iter().enumerate() {
            let spec = Matmul::new(m, n, k).transpose_a(ta).transpose_b(tb);
            check_column_sums_on(d, spec, tiling, 500 + 10 * t as u64 + 2 * s as u64);
        }
    }
    // A batch of products, f16 B and a split k fall back: no sums.
    let spec = Matmul::batched(2, 4, 4, 4);
    let x = d.upload(&random_vec(32, 1, -1.0, 1.0)).unwrap();
    assert!(d.matmul_column_sums(&x, &x, &spec).unwrap().1.is_none());
    let half = d.cast(&x, DType::F16).unwrap();
    let spec = Matmul::new(4, 4, 4);
    assert!(d.matmul_column_sums(&x, &half, &spec).unwrap().1.is_none());
    let long = d.upload(&random_vec(32 * 4096, 2, -1.0, 1.0)).unwrap();
    let small = d.upload(&random_vec(9 * 4096, 3, -1.0, 1.0)).unwrap();
    let spec = Matmul::new(32, 9, 4096).transpose_a(true);
    assert!(d
        .matmul_column_sums(&long, &small, &spec)
        .unwrap()
        .1
        .is_none());
}

/// Ways this device can read f16 operands.
fn half_load_paths() -> Vec<HalfLoads> {
    let mut paths = vec![HalfLoads::Packed];
    if device()
        .features()
        .contains(kiln::device::wgpu::Features::SHADER_F16)
    {
        paths.push(HalfLoads::Native);
    } else {
        eprintln!("no SHADER_F16 on this adapter: native f16 loads not checked");
    }
    paths
}

/// `spec` with A and/or B stored as f16, against the f64 product of the
/// f16-rounded inputs: each product of two halves is exact in f32, so the
/// f32 tolerance applies unchanged.
fn check_half_matmul(spec: Matmul, tiling: MatmulTiling, half: HalfLoads, dtypes: [DType; 2]) {
    let d = device();
    let a_len = (spec.batch - 1) * spec.batch_stride_a + spec.m * spec.k;
    let b_len = (spec.batch - 1) * spec.batch_stride_b + spec.k * spec.n;
    let round = |v: Vec<f32>, dtype: DType| -> Vec<f32> {
        if dtype == DType::F16 {
            v.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
        } else {
            v
        }
    };
    let a = round(random_vec(a_len, 31, -2.0, 2.0), dtypes[0]);
    let b = round(random_vec(b_len, 32, -2.0, 2.0), dtypes[1]);
    let upload = |v: &[f32], dtype: DType| {
        let g = d.upload(v).unwrap();
        d.cast(&g, dtype).unwrap()
    };
    let (ga, gb) = (upload(&a, dtypes[0]), upload(&b, dtypes[1]));
    let gc = d.matmul_variant(&ga, &gb, &spec, tiling, half).unwrap();
    let got = d.read::<f32>(&gc).unwrap();
    let (want, scale) = matmul_reference(&a, &b, &spec);
    let what = format!("{tiling} {half:?} {dtypes:?} {spec:?}");
    assert_close_scaled(&what, &got, &want, &scale, 1e-4);
}

#[test]
fn f16_operands_match_reference_for_every_tiling_and_load_path() {
    const BOTH: [DType; 2] = [DType::F16, DType::F16];
    const TRANSPOSES: [(bool, bool); 4] =
        [(false, false), (true, false), (false, true), (true, true)];
    let d = device();
    // Kernel compiles dominate this test's time on a CPU adapter (seconds for
    // the big register tiles), so: every tiling with the loads this device
    // uses in one layout; then with the tuned tiling, every load path over
    // every layout (vec4 loads), two layouts of odd shapes (scalar loads),
    // mixed operand types and split k. The f32 tests cover every layout of
    // the indexing code, which does not depend on the operand type.
    // m, n and k all differ, so a loader that strides by the wrong one of
    // them cannot match (a square product would hide it); multiples of 4
    // keep the vec4 loads, and the kernel compiled per tiling is the same.
    for tiling in tilings() {
        check_half_matmul(Matmul::new(36, 20, 44), tiling, d.half_loads(), BOTH);
    }
    let tiling = d.tuning().matmul;
    for half in half_load_paths() {
        for (ta, tb) in TRANSPOSES {
            let spec = Matmul::new(36, 20, 44).transpose_a(ta).transpose_b(tb);
            check_half_matmul(spec, tiling, half, BOTH);
        }
        for (ta, tb) in [(false, false), (true, true)] {
            let spec = Matmul::new(17, 130, 129).transpose_a(ta).transpose_b(tb);
            check_half_matmul(spec, tiling, half, BOTH);
        }
        let spec = Matmul::batched(3, 36, 20, 44);
        check_half_matmul(spec, tiling, half, [DType::F16, DType::F32]);
        check_half_matmul(spec, tiling, half, [DType::F32, DType::F16]);
        let split = Matmul::new(32, 9, 4096).transpose_a(true);
        check_half_matmul(split, tiling, half, BOTH);
    }
}

/// f16 operands multiplied in f16 ([`HalfLoads::NativeArithmetic`]): within
/// four-term f16 rounding of the f64 product on every tiling (register and
/// vec4 shared ones run it themselves, others hand it to register tiles) and
/// layout, and provably f16 inside: with every entry 1 + 2^-10 each product
/// rounds to 1 + 2^-9 in f16 (f32 keeps the 2^-20 term), and 1024 four-term
/// sums added up in f32 reach 4104 exactly (an f16 sum would stall near
/// 4096).
#[test]
fn f16_arithmetic_matches_rounded_reference_and_multiplies_in_f16() {
    let d = device();
    let half_math = HalfLoads::NativeArithmetic;
    if !d
        .features()
        .contains(kiln::device::wgpu::Features::SHADER_F16)
    {
        // Where the adapter cannot, asking must fail clearly.
        assert!(d.set_half_arithmetic(true).is_err());
        let x = d
            .cast(&d.upload(&[1.0f32; 16]).unwrap(), DType::F16)
            .unwrap();
        let spec = Matmul::new(4, 4, 4);
        assert!(d
            .matmul_variant(&x, &x, &spec, Tuning::CPU.matmul, half_math)
            .is_err());
        eprintln!("no SHADER_F16 on this adapter: f16 arithmetic not checked");
        return;
    }
    for tiling in tilings() {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let spec = Matmul::new(36, 20, 44).transpose_a(ta).transpose_b(tb);
            let d = device();
            let a = random_vec(spec.m * spec.k, 41, -2.0, 2.0);
            let b = random_vec(spec.k * spec.n, 42, -2.0, 2.0);
            let a: Vec<f32> = a.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
            let b: Vec<f32> = b.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
            let ga = d.cast(&d.upload(&a).unwrap(), DType::F16).unwrap();
            let gb = d.cast(&d.upload(&b).unwrap(), DType::F16).unwrap();
            let gc = d
                .matmul_variant(&ga, &gb, &spec, tiling, half_math)
                .unwrap();
            let got = d.read::<f32>(&gc).unwrap();
            let (want, scale) = matmul_reference(&a, &b, &spec);
            // Four products and three sums rounded to f16 (2^-11 each) per dot.
            let what = format!("{tiling} f16 arithmetic {spec:?}");
            assert_close_scaled(&what, &got, &want, &scale, 4e-3);
        }
    }
    let x = 1.0 + 2f32.powi(-10);
    let ones = d
        .cast(&d.upload(&vec![x; 4 * 4096]).unwrap(), DType::F16)
        .unwrap();
    let f32_ones = d.upload(&[x; 16]).unwrap();
    let tiling = d.tuning().matmul;
    for (ta, tb) in [(false, false), (true, true)] {
        let dot = Matmul::new(4, 4, 4).transpose_a(ta).transpose_b(tb);
        let product = |a, b, half| {
            let c = d.matmul_variant(a, b, &dot, tiling, half).unwrap();
            d.read::<f32>(&c).unwrap()
        };
        // 4 (1 + 2^-10)^2 = 4 + 2^-7 + 2^-18: f16 products drop the 2^-18.
        let in_f32 = 4.0 + 2f32.powi(-7) + 2f32.powi(-18);
        assert_eq!(
            product(&ones, &ones, half_math),
            vec![4.0 + 2f32.powi(-7); 16]
        );
        assert_eq!(product(&ones, &ones, HalfLoads::Native), vec![in_f32; 16]);
        // Operands that are not both f16 keep f32 arithmetic.
        assert_eq!(product(&ones, &f32_ones, half_math), vec![in_f32; 16]);
        let long = Matmul::new(4, 4, 4096).transpose_a(ta).transpose_b(tb);
        let c = d
            .matmul_variant(&ones, &ones, &long, tiling, half_math)
            .unwrap();
        assert_eq!(d.read::<f32>(&c).unwrap(), vec![4104.0; 16], "{long:?}");
    }
}

#[test]
fn matmul_with_empty_inner_dimension_is_zero() {
    let d = device();
    let a = d.upload::<f32>(&[]).unwrap();
    let c = d.matmul(&a, &a, &Matmul::new(3, 2, 0)).unwrap();
    assert_eq!(d.read::<f32>(&c).unwrap(), vec![0.0; 6]);
}

#[test]
fn matmul_with_no_outputs_is_empty_on_every_path() {
    // A zero-width layer's weight gradient is `A^T B` with n = 0, which GPU
    // kernel classes would otherwise consider splitting along k.
    let d = device();
    let a = d.upload(&random_vec(4 * 3, 5, -1.0, 1.0)).unwrap();
    let none = d.upload::<f32>(&[]).unwrap();
    for spec in [
        Matmul::new(3, 0, 4).transpose_a(true),
        Matmul::new(0, 3, 4).transpose_b(true),
        Matmul::new(3, 0, 4),
    ] {
        let (lhs, rhs) = match spec.m {
            0 => (&none, &a),
            _ => (&a, &none),
        };
        let c = d.matmul(lhs, rhs, &spec).unwrap();
        assert!(d.read::<f32>(&c).unwrap().is_empty(), "{spec:?}");
    }
}

#[test]
fn matmul_rejects_mismatched_buffers_with_a_clear_error() {
    let d = device();
    let a = d.upload(&random_vec(12, 1, -1.0, 1.0)).unwrap(); // 3x4
    let b = d.upload(&random_vec(30, 2, -1.0, 1.0)).unwrap(); // 5x6
    let err = d.matmul(&a, &b, &Matmul::new(3, 6, 5)).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, DeviceError::Shape { op: "matmul", .. }),
        "{msg}"
    );
    assert!(
        msg.contains("A holds 12 elements but the shape needs 15"),
        "{msg}"
    );
}

// ----- elementwise -----------------------------------------------------------

fn unary_reference(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Square => x * x,
        UnaryOp::Sin => x.sin(),
        UnaryOp::Cos => x.cos(),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::LeakyRelu(a) => {
            if x > 0.0 {
                x
            } else {
                f64::from(a) * x
            }
        }
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        UnaryOp::Erf => erf(x),
        UnaryOp::AddScalar(s) => x + f64::from(s),
        UnaryOp::MulScalar(s) => x * f64::from(s),
        UnaryOp::PowScalar(s) => x.powf(f64::from(s)),
    }
}

#[test]
fn unary_ops_match_reference() {
    let d = device();
    let ops = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Square,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Relu,
        UnaryOp::LeakyRelu(0.01),
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
        UnaryOp::Gelu,
        UnaryOp::Erf,
        UnaryOp::AddScalar(0.75),
        UnaryOp::MulScalar(-1.5),
        UnaryOp::PowScalar(1.7),
    ];
    for (i, op) in ops.into_iter().enumerate() {
        // Positive domains for ops undefined at or below zero.
        let (lo, hi) = match op {
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::PowScalar(_) => (0.05, 4.0),
            UnaryOp::Recip => (0.1, 3.0),
            _ => (-6.0, 6.0),
        };
        for n in [1, 7, 1000, 4099] {
            let x = random_vec(n, 100 + i as u64, lo, hi);
            let gx = d.upload(&x).unwrap();
            let got = d.read::<f32>(&d.unary(op, &gx).unwrap()).unwrap();
            let want: Vec<f64> = x
                .iter()
                .map(|&v| unary_reference(op, f64::from(v)))
                .collect();
            assert_close(&format!("{op:?} n={n}"), &got, &want, 1e-4, 1e-6);
        }
    }
}

#[test]
fn tanh_saturates_and_pow_takes_negative_bases_as_pytorch_does() {
    // WGSL leaves tanh undefined past |x| = 88.7 and pow undefined for
    // negative bases; exp-based implementations (most GPUs) give NaN there.
    let d = device();
    let big = [100.0f32, -100.0, 1e4, -3.0e38, 15.5, -20.0, 0.25];
    let got = d
        .read::<f32>(&d.unary(UnaryOp::Tanh, &d.upload(&big).unwrap()).unwrap())
        .unwrap();
    let want: Vec<f64> = big.iter().map(|&v| f64::from(v).tanh()).collect();
    assert_close("tanh of large inputs", &got, &want, 1e-6, 1e-7);
    // Within 1e-6 relative everywhere, tiny inputs included (where tanh
    // built from exp loses all relative accuracy), either side of the
    // switch from series to exponential at 0.55.
    let mut x = random_vec(4096, 131, -6.0, 6.0);
    x.extend(random_vec(1024, 132, -1.0, 1.0).iter().map(|v| v * 1e-3));
    x.extend([
        0.55,
        -0.55,
        0.549_999_9,
        1e-30,
        -1e-30,
        3.0e-8,
        14.99,
        -15.01,
    ]);
    let got = d
        .read::<f32>(&d.unary(UnaryOp::Tanh, &d.upload(&x).unwrap()).unwrap())
        .unwrap();
    let want: Vec<f64> = x.iter().map(|&v| f64::from(v).tanh()).collect();
    assert_close("tanh to 1e-6 relative", &got, &want, 1e-6, 0.0);

    // Integer exponents of negative bases, odd and even, and 0^0 = 1;
    // PyTorch's pow. Non-integer exponents of negative bases are NaN.
    let bases = random_vec(64, 130, -3.0, 3.0);
    for p in [2.0f32, 3.0, -1.0, -2.0, 0.0, 5.0] {
        let mut x = bases.clone();
        if p >= 0.0 {
            x[0] = 0.0;
        }
        let got = d
            .read::<f32>(
                &d.unary(UnaryOp::PowScalar(p), &d.upload(&x).unwrap())
                    .unwrap(),
            )
            .unwrap();
        let want: Vec<f64> = x.iter().map(|&v| f64::from(v).powf(f64::from(p))).collect();
        assert_close(&format!("x^{p}"), &got, &want, 1e-5, 1e-6);
    }
    let x = d.upload(&[-2.0f32, 0.0, 4.0]).unwrap();
    let got = d
        .read::<f32>(&d.unary(UnaryOp::PowScalar(0.5), &x).unwrap())
        .unwrap();
    assert!(got[0].is_nan() && got[1] == 0.0 && got[2] == 2.0, "{got:?}");
    let got = d
        .read::<f32>(&d.unary(UnaryOp::PowScalar(-1.5), &x).unwrap())
        .unwrap();
    assert!(
        got[1] == f32::INFINITY && (got[2] - 0.125).abs() < 1e-7,
        "{got:?}"
    );
}

fn binary_reference(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::Pow => a.powf(b),
    }
}

#[test]
fn binary_ops_broadcast_like_numpy() {
    let d = device();
    // Cases with a multiple of 4 elements take the packed (vec4) kernels when
    // the inputs match the output or are scalars, or when the innermost
    // (collapsed) extent is a multiple of 4 too ([6, 8] + [8], [5, 1, 4] +
    // [3, 4]); the others the per-element ones.
    let cases: [(&[usize], &[usize]); 11] = [
        (&[33, 65], &[33, 65]),
        (&[12, 8], &[12, 8]),
        (&[16], &[1]),
        (&[6, 8], &[8]),
        (&[5, 1, 4], &[3, 4]),
        (&[33, 65], &[65]),
        (&[33, 1], &[1, 65]),
        (&[3, 1, 17], &[5, 1]),
        (&[1], &[4, 7]),
        (&[2, 3, 4, 5], &[3, 1, 5]),
        (&[1, 1], &[1]),
    ];
    let ops = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
    ];
    for (c, (sa, sb)) in cases.iter().enumerate() {
        for (o, op) in ops.into_iter().enumerate() {
            let seed = (c * 10 + o) as u64;
            let (lo, hi) = if op == BinaryOp::Pow {
                (0.1, 3.0)
            } else {
                (-2.0, 2.0)
            };
            let a = random_vec(sa.iter().product(), seed, lo, hi);
            // Divisors kept away from zero.
            let b = random_vec(sb.iter().product(), seed + 1000, 0.25, 2.0)
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    if i % 2 == 0 || op == BinaryOp::Pow {
                        v
                    } else {
                        -v
                    }
                })
                .collect::<Vec<_>>();
            let ga = d.upload(&a).unwrap();
            let gb = d.upload(&b).unwrap();
            let (gc, shape) = d
                .binary(op, Operand::new(&ga, sa), Operand::new(&gb, sb))
                .unwrap();
            let (want, want_shape) =
                broadcast_reference(&[sa, sb], &[&a, &b], |v| binary_reference(op, v[0], v[1]));
            assert_eq!(shape, want_shape);
            let got = d.read::<f32>(&gc).unwrap();
            assert_close(&format!("{op:?} {sa:?} {sb:?}"), &got, &want, 1e-4, 1e-6);
        }
    }
}

#[test]
fn custom_expression_with_three_inputs_and_scalars() {
    let d = device();
    let (sa, sb, sc): (&[usize], &[usize], &[usize]) = (&[4, 1, 6], &[5, 6], &[1]);
    let a = random_vec(24, 1, -1.0, 1.0);
    let b = random_vec(30, 2, -1.0, 1.0);
    let c = random_vec(1, 3, -1.0, 1.0);
    let (ga, gb, gc) = (
        d.upload(&a).unwrap(),
        d.upload(&b).unwrap(),
        d.upload(&c).unwrap(),
    );
    let op = Elementwise::new("fma_tanh", "tanh(x0 * s0 + x1) * x2 + s1").scalars(&[1.5, -0.25]);
    let (out, shape) = d
        .elementwise(
            &op,
            &[
                Operand::new(&ga, sa),
                Operand::new(&gb, sb),
                Operand::new(&gc, sc),
            ],
        )
        .unwrap();
    let (want, want_shape) = broadcast_reference(&[sa, sb, sc], &[&a, &b, &c], |v| {
        (v[0] * 1.5 + v[1]).tanh() * v[2] - 0.25
    });
    assert_eq!(shape, want_shape);
    assert_close("custom", &d.read::<f32>(&out).unwrap(), &want, 1e-4, 1e-6);
}

#[test]
fn elementwise_beyond_one_dispatch_row_uses_the_2d_grid() {
    // More than 65535 workgroups of 256: the kernel must rebuild the index from y
    // (an odd count, so one element per invocation).
    let d = device();
    let n = 65_535 * 256 + 1001;
    let x: Vec<f32> = (0..n).map(|i| (i % 1013) as f32 * 0.5 - 7.0).collect();
    let gx = d.upload(&x).unwrap();
    let got = d
        .read::<f32>(&d.unary(UnaryOp::AddScalar(3.0), &gx).unwrap())
        .unwrap();
    for i in (0..n).step_by(4099).chain(n - 1001..n) {
        assert_eq!(got[i], x[i] + 3.0, "element {i}");
    }
}

#[test]
fn broadcast_mismatch_names_the_op_and_both_shapes() {
    let d = device();
    let a = d.upload(&random_vec(6, 1, -1.0, 1.0)).unwrap();
    let b = d.upload(&random_vec(4, 2, -1.0, 1.0)).unwrap();
    let err = d
        .binary(
            BinaryOp::Add,
            Operand::new(&a, &[2, 3]),
            Operand::new(&b, &[4]),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "add: cannot broadcast shapes [2, 3] and [4]"
    );
}

#[test]
fn strided_copy_transposes_permutes_and_slices() {
    let d = device();
    let x = random_vec(3 * 5 * 7, 11, -1.0, 1.0); // [3, 5, 7]
    let gx = d.upload(&x).unwrap();
    // Permute to [7, 3, 5]: out[i, j, k] = x[j, k, i].
    let got = d
        .read::<f32>(&d.strided_copy(&gx, &[7, 3, 5], &[1, 35, 7], 0).unwrap())
        .unwrap();
    let mut want = Vec::new();
    for i in 0..7 {
        for j in 0..3 {
            for k in 0..5 {
                want.push(x[j * 35 + k * 7 + i]);
            }
        }
    }
    assert_eq!(got, want);
    // Slice x[1:3, 2:4, 5:7] through an offset.
    let got = d
        .read::<f32>(
            &d.strided_copy(&gx, &[2, 2, 2], &[35, 7, 1], 35 + 14 + 5)
                .unwrap(),
        )
        .unwrap();
    let mut want = Vec::new();
    for j in 1..3 {
        for k in 2..4 {
            for i in 5..7 {
                want.push(x[j * 35 + k * 7 + i]);
            }
        }
    }
    assert_eq!(got, want);
    // The same with an innermost extent of 4, which goes four elements per
    // invocation: x as [4, 6, 8] permuted to [6, 8, 4], and x[1:3, 2:4, 4:8].
    let x = random_vec(4 * 6 * 8, 12, -1.0, 1.0);
    let gx = d.upload(&x).unwrap();
    let got = d
        .read::<f32>(&d.strided_copy(&gx, &[6, 8, 4], &[8, 1, 48], 0).unwrap())
        .unwrap();
    let mut want = Vec::new();
    for i in 0..6 {
        for j in 0..8 {
            for k in 0..4 {
                want.push(x[k * 48 + i * 8 + j]);
            }
        }
    }
    assert_eq!(got, want);
    let got = d
        .read::<f32>(
            &d.strided_copy(&gx, &[2, 2, 4], &[48, 8, 1], 48 + 16 + 4)
                .unwrap(),
        )
        .unwrap();
    let mut want = Vec::new();
    for j in 1..3 {
        for k in 2..4 {
            for i in 4..8 {
                want.push(x[j * 48 + k * 8 + i]);
            }
        }
    }
    assert_eq!(got, want);
    // A view reaching past the buffer is refused.
    assert!(d.strided_copy(&gx, &[2, 2], &[150, 50], 0).is_err());
}

#[test]
fn elementwise_over_strided_views_matches_reference() {
    use kiln::device::View;
    let d = device();
    let op = Elementwise::new("mul_add", "x0 * x1 + s0").scalars(&[0.5]);
    // An innermost extent q of 5 runs per element, of 8 four elements per
    // invocation.
    for q in [5, 8] {
        let x = random_vec(3 * q * 7, 21, -1.0, 1.0); // [3, q, 7]
        let y = random_vec(2 * 7 * 3 * q, 22, -1.0, 1.0); // [2, 7, 3, q]
        let (gx, gy) = (d.upload(&x).unwrap(), d.upload(&y).unwrap());
        // x permuted to [7, 3, q] and y's second entry, both read as [7, 3, q].
        let views = [
            View {
                buffer: &gx,
                strides: &[1, 7 * q, 7],
                offset: 0,
            },
            View {
                buffer: &gy,
                strides: &[3 * q, q, 1],
                offset: 21 * q,
            },
        ];
        let got = d
            .read::<f32>(&d.elementwise_views(&op, &views, &[7, 3, q]).unwrap())
            .unwrap();
        let mut want = Vec::new();
        for i in 0..7 {
            for j in 0..3 {
                for k in 0..q {
                    let (a, b) = (x[j * 7 * q + k * 7 + i], y[21 * q + i * 3 * q + j * q + k]);
                    want.push(f64::from(a) * f64::from(b) + 0.5);
                }
            }
        }
        assert_close(
            &format!("elementwise over views, q={q}"),
            &got,
            &want,
            1e-6,
            1e-7,
        );
    }
    let x = random_vec(3 * 5 * 7, 21, -1.0, 1.0);
    let y = random_vec(2 * 7 * 3 * 5, 22, -1.0, 1.0);
    let (gx, gy) = (d.upload(&x).unwrap(), d.upload(&y).unwrap());
    let views = [
        View {
            buffer: &gx,
            strides: &[1, 35, 7],
            offset: 0,
        },
        View {
            buffer: &gy,
            strides: &[15, 5, 1],
            offset: 105,
        },
    ];
    // Every view must fit its buffer.
    let past = View {
        buffer: &gx,
        strides: &[1, 35, 8],
        offset: 0,
    };
    let err = d
        .elementwise_views(&op, &[views[1], past], &[7, 3, 5])
        .unwrap_err()
        .to_string();
    assert!(err.contains("reaches element"), "{err}");
}

#[test]
fn strided_write_fills_only_its_view() {
    let d = device();
    let base = random_vec(3 * 5 * 7, 12, -1.0, 1.0);
    let block = random_vec(8, 13, -1.0, 1.0);
    let dst = d.upload(&base).unwrap();
    let src = d.upload(&block).unwrap();
    // dst[1:3, 2:4, 5:7] = block
    d.strided_write(&dst, &[2, 2, 2], &[35, 7, 1], 35 + 14 + 5, &src)
        .unwrap();
    let got = d.read::<f32>(&dst).unwrap();
    let mut want = base.clone();
    let mut k = 0;
    for j in 1..3 {
        for l in 2..4 {
            for i in 5..7 {
                want[j * 35 + l * 7 + i] = block[k];
                k += 1;
            }
        }
    }
    assert_eq!(got, want);
    assert!(d.strided_write(&dst, &[2, 4], &[100, 10], 0, &src).is_err());
    // A view that reaches an element twice would have invocations racing
    // for it; such views are refused and leave dst as it was. A transposed
    // one (strides out of order) is still one-to-one.
    for (shape, strides) in [([2, 4], [2, 1]), ([4, 2], [1, 2]), ([2, 4], [0, 1])] {
        let err = d
            .strided_write(&dst, &shape, &strides, 0, &src)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("may reach an element twice"),
            "{strides:?}: {err}"
        );
    }
    assert_eq!(d.read::<f32>(&dst).unwrap(), want);
    d.strided_write(&dst, &[2, 4], &[1, 2], 0, &src).unwrap();
    let got = d.read::<f32>(&dst).unwrap();
    for (k, v) in block.iter().enumerate() {
        let (r, c) = (k / 4, k % 4);
        assert_eq!(got[r + 2 * c], *v, "element {k}");
    }
}

// ----- reductions ------------------------------------------------------------

/// `op` over `axis` of a row-major `shape`, with each output's sum of
/// absolute terms (the tolerance's scale). The outer / axis / inner split is
/// derived here, not taken from the library's `Reduce` spec.
fn reduce_reference(x: &[f32], shape: &[usize], axis: usize, op: ReduceOp) -> (Vec<f64>, Vec<f64>) {
    let outer: usize = shape[..axis].iter().product();
    let len = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = Vec::new();
    let mut scale = Vec::new();
    for o in 0..outer {
        for i in 0..inner {
            let vals: Vec<f64> = (0..len)
                .map(|l| f64::from(x[(o * len + l) * inner + i]))
                .collect();
            let abs: f64 = vals.iter().map(|v| v.abs()).sum();
            let (v, s) = match op {
                ReduceOp::Sum => (vals.iter().sum(), abs),
                ReduceOp::Mean => (vals.iter().sum::<f64>() / len as f64, abs / len as f64),
                ReduceOp::Max => (vals.iter().cloned().fold(f64::MIN, f64::max), 0.0),
                ReduceOp::Min => (vals.iter().cloned().fold(f64::MAX, f64::min), 0.0),
            };
            out.push(v);
            scale.push(s);
        }
    }
    (out, scale)
}

#[test]
fn reductions_match_reference_on_every_axis_and_strategy() {
    let d = device();
    let shapes: [&[usize]; 5] = [&[1], &[7], &[33, 65, 17], &[3, 1000, 2], &[2, 5000]];
    for (s_idx, shape) in shapes.iter().enumerate() {
        let x = random_vec(shape.iter().product(), s_idx as u64, -3.0, 3.0);
        let gx = d.upload(&x).unwrap();
        for axis in 0..shape.len() {
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
                let spec = Reduce::axis(op, shape, axis).unwrap();
                let (want, scale) = reduce_reference(&x, shape, axis, op);
                for strategy in [
                    ReduceStrategy::Auto,
                    ReduceStrategy::Thread,
                    ReduceStrategy::Workgroup,
                ] {
                    let got = d
                        .read::<f32>(&d.reduce_with(&gx, &spec, strategy).unwrap())
                        .unwrap();
                    let what = format!("{op:?} axis {axis} of {shape:?} ({strategy:?})");
                    if matches!(op, ReduceOp::Max | ReduceOp::Min) {
                        assert_close(&what, &got, &want, 0.0, 0.0);
                    } else {
                        assert_close_scaled(&what, &got, &want, &scale, 1e-4);
                    }
                }
            }
        }
    }
}

// ----- softmax ---------------------------------------------------------------

#[test]
fn softmax_and_log_softmax_match_reference() {
    let d = device();
    // Rows of whole vec4s (12, 128) are read four columns at a time where
    // an invocation takes a row.
    for (rows, cols) in [
        (1, 1),
        (1, 7),
        (33, 65),
        (5, 1000),
        (130, 10),
        (9, 12),
        (6, 128),
    ] {
        // Rows shifted by +-200 check the max subtraction: exp(200)
        // overflows f32, so a kernel without it returns inf and NaN there.
        // The spread of 16 within a row keeps its probabilities above the
        // absolute tolerance.
        let mut x = random_vec(rows * cols, (rows * cols) as u64, -8.0, 8.0);
        for (r, row) in x.chunks_mut(cols).enumerate() {
            let shift = [200.0, -200.0, 0.0][r % 3];
            row.iter_mut().for_each(|v| *v += shift);
        }
        let gx = d.upload(&x).unwrap();
        let mut soft = Vec::new();
        let mut log_soft = Vec::new();
        for r in 0..rows {
            let row: Vec<f64> = x[r * cols..(r + 1) * cols]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            soft.extend(row.iter().map(|v| (v - lse).exp()));
            log_soft.extend(row.iter().map(|v| v - lse));
        }
        let got = d.read::<f32>(&d.softmax(&gx, rows, cols).unwrap()).unwrap();
        assert_close(&format!("softmax {rows}x{cols}"), &got, &soft, 1e-4, 1e-7);
        let got = d
            .read::<f32>(&d.log_softmax(&gx, rows, cols).unwrap())
            .unwrap();
        assert_close(
            &format!("log_softmax {rows}x{cols}"),
            &got,
            &log_soft,
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn softmax_cross_entropy_matches_reference() {
    let d = device();
    // Short rows run one invocation per row, long ones a workgroup per row
    // (on CPU adapters from 512 columns, under the GPU kernel class from 64).
    // Up to 1024 short rows also give their total: one workgroup walks them
    // all, several rows per invocation past 64.
    for (rows, cols) in [(1, 1), (7, 10), (33, 65), (700, 12), (1500, 8), (5, 1000)] {
        // Spread 16 within a row, rows shifted by up to +-200 (the max
        // subtraction: exp(200) overflows f32).
        let mut x = random_vec(rows * cols, (rows + cols) as u64, -8.0, 8.0);
        // Every third row ignored (an id past the classes).
        let labels: Vec<u32> = (0..rows)
            .map(|r| {
                if r % 3 == 2 {
                    u32::MAX
                } else {
                    ((r * 7) % cols) as u32
                }
            })
            .collect();
        // Tied maxima, where the prediction is the first of them (as
        // argmax): rows of equal logits, and rows whose label shares its
        // maximum with column 0.
        for (r, row) in x.chunks_mut(cols).enumerate() {
            let label = labels[r] as usize;
            if r % 5 == 1 {
                row.fill(2.5);
            } else if r % 5 == 3 && label < cols {
                row[0] = 9.0;
                row[label] = 9.0;
            }
            let shift = [200.0, 0.0, -200.0, 60.0][r % 4];
            row.iter_mut().for_each(|v| *v += shift);
        }
        let scale = 0.25f32;
        let (mut want_loss, mut want_grad, mut want_hits) = (Vec::new(), Vec::new(), 0.0);
        for (r, &label) in labels.iter().enumerate() {
            let row: Vec<f64> = x[r * cols..(r + 1) * cols]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let top = row.iter().cloned().fold(f64::MIN, f64::max);
            let argmax = row.iter().position(|&v| v == top);
            if argmax == Some(label as usize) {
                want_hits += 1.0;
            }
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let weight = if label == u32::MAX {
                0.0
            } else {
                f64::from(scale)
            };
            let picked = row.get(label as usize).copied().unwrap_or(lse);
            want_loss.push((lse - picked) * weight);
            want_grad.extend(row.iter().enumerate().map(|(c, v)| {
                let onehot = if c == label as usize { 1.0 } else { 0.0 };
                ((v - lse).exp() - onehot) * weight
            }));
        }
        let gx = d.upload(&x).unwrap();
        let gl = d.upload(&labels).unwrap();
        let fused = d
            .softmax_cross_entropy(&gx, &gl, rows, cols, scale)
            .unwrap();
        let (loss, grad) = (fused.row_loss, fused.grad);
        let what = format!("cross-entropy {rows}x{cols}");
        assert_eq!(fused.total.is_some(), cols < 512 && rows <= 1024, "{what}");
        assert_eq!(fused.hits.is_some(), fused.total.is_some(), "{what}");
        if let Some(hits) = fused.hits {
            // Random logits: about one row in `cols` has its label on top.
            assert_eq!(
                d.read::<f32>(&hits).unwrap(),
                vec![want_hits as f32],
                "{what} hits"
            );
        }
        if let Some(total) = fused.total {
            let want: f64 = want_loss.iter().sum();
            let scale: f64 = want_loss.iter().map(|v| v.abs()).sum();
            let got = d.read::<f32>(&total).unwrap();
            assert_close_scaled(&format!("{what} total"), &got, &[want], &[scale], 1e-5);
        }
        assert_close(
            &what,
            &d.read::<f32>(&loss).unwrap(),
            &want_loss,
            1e-4,
            1e-6,
        );
        assert_close(
            &what,
            &d.read::<f32>(&grad).unwrap(),
            &want_grad,
            1e-4,
            1e-7,
        );
        // A running tally (from non-zero totals) takes two batches' unscaled
        // loss sums and hits where the kernel adds the batch up; elsewhere it
        // is left alone.
        let start = [3.5f32, 7.0];
        let tally = d.upload(&start).unwrap();
        let mut tallied = Vec::new();
        for _ in 0..2 {
            let out = d
                .softmax_cross_entropy_tallied(&gx, &gl, rows, cols, scale, &tally)
                .unwrap();
            assert_eq!(out.tallied, out.total.is_some(), "{what} tallied");
            tallied.push(out.tallied);
            // Its loss and gradient are the plain kernel's.
            let tallied_what = format!("{what} (tallied)");
            let row_loss = d.read::<f32>(&out.row_loss).unwrap();
            assert_close(&tallied_what, &row_loss, &want_loss, 1e-4, 1e-6);
            let grad = d.read::<f32>(&out.grad).unwrap();
            assert_close(&tallied_what, &grad, &want_grad, 1e-4, 1e-7);
        }
        let got = d.read::<f32>(&tally).unwrap();
        let raw: f64 = want_loss.iter().sum::<f64>() / f64::from(scale);
        let raw_scale: f64 = want_loss.iter().map(|v| v.abs()).sum::<f64>() / f64::from(scale);
        let (want_tally, tally_scale) = match tallied[0] {
            true => (
                [
                    f64::from(start[0]) + 2.0 * raw,
                    f64::from(start[1]) + 2.0 * want_hits,
                ],
                [2.0 * raw_scale + 4.0, 1.0],
            ),
            false => ([f64::from(start[0]), f64::from(start[1])], [1.0, 1.0]),
        };
        assert_close_scaled(
            &format!("{what} tally"),
            &got,
            &want_tally,
            &tally_scale,
            1e-5,
        );
    }
    // The tally must be two f32.
    let (gx, gl) = (
        d.upload(&[0.5f32; 6]).unwrap(),
        d.upload(&[0u32; 2]).unwrap(),
    );
    let err = d
        .softmax_cross_entropy_tallied(&gx, &gl, 2, 3, 1.0, &d.upload(&[0.0f32; 3]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tally"), "{err}");
    // Labels must be one u32 per row.
    let gx = d.upload(&[0.5f32; 6]).unwrap();
    let err = d
        .softmax_cross_entropy(&gx, &d.upload(&[0u32; 3]).unwrap(), 2, 3, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("labels must be 2 u32 class ids"), "{err}");
}

#[test]
fn scaled_softmax_with_a_row_block_bias_matches_reference() {
    use kiln::device::SoftmaxInput;
    let d = device();
    // rows = groups * block: each group of rows shares one bias row.
    // On CPU adapters rows shorter than 512 take the row-per-invocation
    // kernel, the last case the workgroup-per-row one; under the GPU kernel
    // class rows of 64 or more take a workgroup too.
    for (groups, block, cols, scale) in [
        (1, 1, 5, 0.5f32),
        (3, 4, 9, 0.125),
        (2, 7, 130, 2.0),
        (2, 5, 128, 0.25),
        (3, 2, 16, 1.0),
        (2, 3, 600, 0.7),
    ] {
        let rows = groups * block;
        let x = random_vec(rows * cols, (rows * cols) as u64 + 7, -10.0, 10.0);
        // A padding-style mask (-1e9 on some columns) plus random offsets.
        let bias: Vec<f32> = random_vec(groups * cols, 11, -2.0, 2.0)
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if i % cols > cols / 2 && i / cols == groups - 1 {
                    -1e9
                } else {
                    v
                }
            })
            .collect();
        let mut want = Vec::new();
        for r in 0..rows {
            let g = r / block;
            let z: Vec<f64> = (0..cols)
                .map(|c| {
                    f64::from(scale) * f64::from(x[r * cols + c]) + f64::from(bias[g * cols + c])
                })
                .collect();
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
            want.extend(z.iter().map(|v| (v - m).exp() / sum));
        }
        let (gx, gb) = (d.upload(&x).unwrap(), d.upload(&bias).unwrap());
        let input = SoftmaxInput {
            scale,
            bias: Some(&gb),
        };
        let got = d
            .read::<f32>(&d.softmax_scaled(&gx, rows, cols, input).unwrap())
            .unwrap();
        assert_close(
            &format!("softmax_scaled {groups}x{block}x{cols}"),
            &got,
            &want,
            1e-4,
            1e-7,
        );
    }
    // A bias whose rows do not divide the rows is refused.
    let gx = d.upload(&random_vec(6 * 4, 3, -1.0, 1.0)).unwrap();
    let gb = d.upload(&random_vec(4 * 4, 4, -1.0, 1.0)).unwrap();
    let input = SoftmaxInput {
        scale: 1.0,
        bias: Some(&gb),
    };
    assert!(d.softmax_scaled(&gx, 6, 4, input).is_err());
}

// ----- buffers ---------------------------------------------------------------

#[test]
fn f16_round_trip_and_dtype_checks() {
    let d = device();
    let x = random_vec(7, 9, -100.0, 100.0); // odd length: exercises the padded tail
    let g = d.upload_f16(&x).unwrap();
    assert_eq!(g.dtype(), DType::F16);
    let back = d.read_f16_as_f32(&g).unwrap();
    for (a, b) in x.iter().zip(&back) {
        assert!((a - b).abs() <= a.abs() * 1e-3, "{a} vs {b}");
    }
    let err = d.read::<f32>(&g).unwrap_err();
    assert!(matches!(err, DeviceError::DType { .. }), "{err}");
    let err = d.unary(UnaryOp::Relu, &g).unwrap_err();
    assert!(err.to_string().contains("F16"), "{err}");
}

#[test]
fn cast_between_f32_and_f16_matches_the_half_crate() {
    let d = device();
    for n in [1usize, 2, 7, 1000] {
        let mut x = random_vec(n, n as u64, -65000.0, 65000.0);
        x[0] = 1e-6; // a subnormal in f16
                     // Overflow: 65519 rounds down to 65504, 65520 up to infinity.
        let extremes = [65519.0, -65520.0, 1e30, f32::INFINITY, f32::NEG_INFINITY];
        for (i, &v) in extremes.iter().enumerate().take(n.saturating_sub(1)) {
            x[i + 1] = v;
        }
        let g = d.upload(&x).unwrap();
        let h = d.cast(&g, DType::F16).unwrap();
        let want: Vec<kiln::device::half::f16> = x
            .iter()
            .map(|&v| kiln::device::half::f16::from_f32(v))
            .collect();
        let got = d.read::<kiln::device::half::f16>(&h).unwrap();
        for i in 0..n {
            assert_eq!(
                got[i].to_bits(),
                want[i].to_bits(),
                "to f16, element {i} ({})",
                x[i]
            );
        }
        let back = d.read::<f32>(&d.cast(&h, DType::F32).unwrap()).unwrap();
        let want_back: Vec<f32> = want.iter().map(|v| v.to_f32()).collect();
        assert_eq!(back, want_back, "to f32, n = {n}");
    }
    let nan = d.upload(&[f32::NAN, 1.0]).unwrap();
    let back = d.read::<f32>(
        &d.cast(&d.cast(&nan, DType::F16).unwrap(), DType::F32)
            .unwrap(),
    );
    assert!(back.unwrap()[0].is_nan(), "NaN must survive the round trip");

    // Where rounding is decided: every value halfway between two
    // neighbouring f16s (which rounds to the even one), subnormal ones
    // included, values at and near the subnormal limits, and random values
    // across the subnormal range.
    use kiln::device::half::f16;
    let mut x: Vec<f32> = (0..0x7bffu16)
        .step_by(7)
        .flat_map(|h| {
            let (a, b) = (f16::from_bits(h).to_f32(), f16::from_bits(h + 1).to_f32());
            [(a + b) / 2.0, -(a + b) / 2.0]
        })
        .collect();
    let tiny = 2f32.powi(-24);
    x.extend([
        0.0,
        -0.0,
        tiny,
        tiny / 2.0,
        tiny * 0.5001,
        tiny * 1.5,
        2f32.powi(-14),
    ]);
    x.extend(
        random_vec(1000, 133, -1.0, 1.0)
            .iter()
            .map(|v| v * 2f32.powi(-13)),
    );
    let got = d
        .read::<f16>(&d.cast(&d.upload(&x).unwrap(), DType::F16).unwrap())
        .unwrap();
    for (v, h) in x.iter().zip(got) {
        assert_eq!(h.to_bits(), f16::from_f32(*v).to_bits(), "to f16: {v:e}");
    }
}

#[test]
fn buffers_beyond_the_binding_limit_fail_clearly() {
    let d = device();
    let too_many = (d.max_buffer_bytes() / 4 + 1) as usize;
    let err = d.empty(too_many, DType::F32).unwrap_err();
    assert!(matches!(err, DeviceError::BufferTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("smaller batch"), "{err}");
}

#[test]
fn copy_and_zeros() {
    let d = device();
    let x = random_vec(1001, 4, -1.0, 1.0);
    let gx = d.upload(&x).unwrap();
    assert_eq!(d.read::<f32>(&d.copy(&gx).unwrap()).unwrap(), x);
    assert_eq!(
        d.read::<f32>(&d.zeros(33, DType::F32).unwrap()).unwrap(),
        vec![0.0; 33]
    );
}

#[test]
fn matmul_entries_into_writes_only_the_chosen_entries() {
    // A recurrence's layout: entry z of A starts at z * m * k, B is shared.
    let d = device();
    for (m, n, k) in [(3, 5, 7), (4, 8, 16)] {
        let batch = 4;
        let spec = Matmul {
            batch_stride_b: 0,
            ..Matmul::batched(batch, m, n, k)
        };
        let a = random_vec(batch * m * k + m * k, 60, -1.0, 1.0);
        let b = random_vec(k * n, 61, -1.0, 1.0);
        let (want, scale) = matmul_reference(&a, &b, &spec);
        let sentinel = vec![-7.5f32; batch * m * n];
        let (ga, gb) = (d.upload(&a).unwrap(), d.upload(&b).unwrap());
        let out = d.upload(&sentinel).unwrap();
        d.matmul_entries_into(&ga, &gb, &out, &spec, 1..3).unwrap();
        let got = d.read::<f32>(&out).unwrap();
        let entry = m * n;
        assert!(got[..entry].iter().all(|&v| v == -7.5), "entry 0 touched");
        assert!(
            got[3 * entry..].iter().all(|&v| v == -7.5),
            "entry 3 touched"
        );
        assert_close_scaled(
            &format!("entries 1..3 of {m}x{n}x{k}"),
            &got[entry..3 * entry],
            &want[entry..3 * entry],
            &scale[entry..3 * entry],
            1e-4,
        );
        assert!(d.matmul_entries_into(&ga, &gb, &out, &spec, 3..5).is_err());
    }
}

// ----- convolution windows ---------------------------------------------------

#[test]
fn im2col_rows_match_reference_and_col2im_is_their_adjoint() {
    use kiln::device::ConvGeometry;
    let d = device();
    // (geometry, row width): patches of 27 with and without padding to 28,
    // and a strided, dilated 2x3 window over 2 channels (patch 12).
    let window = |[n, c, h, w]: [usize; 4], [kh, kw]: [usize; 2], stride, dilation| ConvGeometry {
        n,
        c,
        h,
        w,
        kh,
        kw,
        stride,
        dilation,
    };
    let rgb = window([2, 3, 7, 6], [3, 3], [1, 2], [1, 1]);
    let cases = [
        (rgb, 28),
        (rgb, 27),
        (window([1, 2, 9, 8], [2, 3], [2, 1], [2, 1]), 12),
    ];
    for (i, (g, width)) in cases.into_iter().enumerate() {
        let (oh, ow) = g.output().unwrap();
        let x = random_vec(g.n * g.c * g.h * g.w, 50 + i as u64, -1.0, 1.0);
        let rows = g.n * oh * ow;
        let mut want = vec![0.0f64; rows * width];
        for n in 0..g.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let row = (n * oh + oy) * ow + ox;
                    for c in 0..g.c {
                        for a in 0..g.kh {
                            for b in 0..g.kw {
                                let y = oy * g.stride[0] + a * g.dilation[0];
                                let xx = ox * g.stride[1] + b * g.dilation[1];
                                want[row * width + (c * g.kh + a) * g.kw + b] =
                                    f64::from(x[((n * g.c + c) * g.h + y) * g.w + xx]);
                            }
                        }
                    }
                }
            }
        }
        let gx = d.upload(&x).unwrap();
        let cols = d.im2col(&gx, &g, width).unwrap();
        let got = d.read::<f32>(&cols).unwrap();
        assert_close(
            &format!("im2col {g:?} width {width}"),
            &got,
            &want,
            0.0,
            0.0,
        );
        // <im2col(x), y> = <x, col2im(y)>, padding columns of y included.
        let y = random_vec(rows * width, 60 + i as u64, -1.0, 1.0);
        let back = d
            .read::<f32>(&d.col2im(&d.upload(&y).unwrap(), &g, width).unwrap())
            .unwrap();
        let lhs: f64 = got
            .iter()
            .zip(&y)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        let rhs: f64 = x
            .iter()
            .zip(&back)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        assert!(
            (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0),
            "col2im {g:?}: {lhs} vs {rhs}"
        );
    }
    // A row must hold the whole patch.
    let g = cases[0].0;
    let x = d.upload(&vec![0.5f32; g.n * g.c * g.h * g.w]).unwrap();
    let err = d.im2col(&x, &g, 20).unwrap_err().to_string();
    assert!(
        err.contains("rows of 20 cannot hold a patch of 27"),
        "{err}"
    );
}

#[test]
fn threads_sharing_a_device_keep_their_texture_operands_apart() {
    // Each thread records many products whose A has the same size (so the
    // same operand texture would serve them all) before reading any back:
    // another thread's copy landing between one's copy and its product
    // would make that product read the other's values.
    let d = kiln::Device::new().unwrap();
    d.set_texture_operands(kiln::device::TextureOperands::Always);
    let spec = Matmul::new(64, 32, 48).transpose_b(true);
    std::thread::scope(|s| {
        for thread in 0..2u64 {
            let d = d.clone();
            s.spawn(move || {
                let b = random_vec(spec.n * spec.k, 700 + thread, -1.0, 1.0);
                let gb = d.upload(&b).unwrap();
                let products: Vec<_> = (0..64u64)
                    .map(|i| {
                        let a = random_vec(spec.m * spec.k, 1000 * thread + i, -1.0, 1.0);
                        let c = d.matmul(&d.upload(&a).unwrap(), &gb, &spec).unwrap();
                        (a, c)
                    })
                    .collect();
                for (i, (a, c)) in products.iter().enumerate() {
                    let (want, scale) = matmul_reference(a, &b, &spec);
                    let got = d.read::<f32>(c).unwrap();
                    assert_close_scaled(
                        &format!("thread {thread}, product {i}"),
                        &got,
                        &want,
                        &scale,
                        1e-4,
                    );
                }
            });
        }
    });
}

#[test]
fn matmul_with_texture_operands_matches_reference() {
    // A and B read through textures (the CPU adapters' faster path for large
    // products on some hosts), forced on odd and vec4-friendly shapes, every
    // transpose and a batch, with and without column sums. Epilogues bind
    // after both and are unchanged by them; the BERT tests run large
    // products through this path with both.
    let d = kiln::Device::new().unwrap();
    d.set_texture_operands(kiln::device::TextureOperands::Always);
    // Only CPU adapters' subgroup tilings have the path (and only with vec4
    // loads: the odd shapes check it is declined cleanly): each one the
    // tuner may pick is checked.
    let texture_tilings: Vec<MatmulTiling> = match d.kernels_for_cpu() {
        true => tilings()
            .into_iter()
            .filter(|t| matches!(t, MatmulTiling::Subgroup { .. }))
            .collect(),
        false => Vec::new(),
    };
    let has_path = !texture_tilings.is_empty();
    if !has_path {
        eprintln!(
            "matmul_with_a_texture_operand: {} has no texture path; checking plain products",
            d.tuning().matmul
        );
    }
    let checked = match has_path {
        true => texture_tilings,
        false => vec![d.tuning().matmul],
    };
    let check = |spec: Matmul, seed: u64| {
        for &tiling in &checked {
            check_matmul_on(&d, spec, tiling, seed);
        }
    };
    // Column sums read B where the kernel reads it, so through its texture.
    for (s, &(m, n, k, ta, tb)) in COLUMN_SUM_SHAPES.iter().enumerate() {
        for &tiling in &checked {
            let spec = Matmul::new(m, n, k).transpose_a(ta).transpose_b(tb);
            check_column_sums_on(&d, spec, tiling, 900 + 2 * s as u64);
        }
    }
    // (Profiles name each kernel's operands; only needed where the path is.)
    d.set_profiling(has_path).unwrap();
    // Rows of 256 texels: lengths below, at and past one row and a partial
    // last row; (36, 20, 44) is vec4-friendly with A transposed too.
    for (m, n, k) in [
        (4, 8, 4),
        (33, 64, 36),
        (36, 20, 44),
        (64, 64, 64),
        (130, 36, 1032),
        (17, 130, 129),
    ] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            check(
                Matmul::new(m, n, k).transpose_a(ta).transpose_b(tb),
                (m + n + k) as u64,
            );
        }
        check(Matmul::batched(3, m, n, k), 5);
    }
    // Where the adapter has the path, every layout took it somewhere.
    let profile = d.profile();
    d.set_profiling(false).unwrap();
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let layout = format!(":{ta}{tb}:");
        let took = profile.iter().any(|t| {
            t.kernel.contains(&layout)
                && t.kernel.contains("a_texture: true")
                && t.kernel.contains("b_texture: true")
        });
        assert!(
            took || !has_path,
            "A and B through textures, layout {layout}"
        );
    }
    // Left to the tuning: a large plain product reads both operands
    // through textures only where the autotuner found that faster, and
    // either way matches the reference.
    if let Some(&tiling) = checked.first().filter(|_| has_path) {
        d.set_texture_operands(kiln::device::TextureOperands::Auto);
        let before = d.tuning();
        for (operand_textures, (ta, tb), want) in [
            (true, (false, false), "a_texture: true, b_texture: true"),
            (false, (false, false), "a_texture: false, b_texture: false"),
            (false, (false, true), "a_texture: true, b_texture: false"),
        ] {
            d.set_tuning(kiln::device::Tuning {
                matmul: tiling,
                small_matmul: tiling,
                operand_textures,
            });
            d.set_profiling(true).unwrap();
            let spec = Matmul::new(256, 256, 256).transpose_a(ta).transpose_b(tb);
            check_matmul_on(&d, spec, tiling, 77);
            let ran = d.profile();
            d.set_profiling(false).unwrap();
            assert!(
                ran.iter().any(|t| t.kernel.contains(want)),
                "operand_textures {operand_textures}, {spec:?}: expected {want}, ran {:?}",
                ran.iter().map(|t| &t.kernel).collect::<Vec<_>>()
            );
        }
        d.set_tuning(before);
        d.set_texture_operands(kiln::device::TextureOperands::Always);
    }
    // Two products in a row reuse one texture: the second copy must wait
    // for the first product.
    let x = d.upload(&random_vec(64 * 64, 3, -1.0, 1.0)).unwrap();
    let y = d.upload(&random_vec(64 * 64, 4, -1.0, 1.0)).unwrap();
    let spec = Matmul::new(64, 64, 64);
    let (xy, yx) = (
        d.matmul(&x, &y, &spec).unwrap(),
        d.matmul(&y, &x, &spec).unwrap(),
    );
    d.set_texture_operands(kiln::device::TextureOperands::Never);
    assert_eq!(
        d.read::<f32>(&xy).unwrap(),
        d.read::<f32>(&d.matmul(&x, &y, &spec).unwrap()).unwrap()
    );
    assert_eq!(
        d.read::<f32>(&yx).unwrap(),
        d.read::<f32>(&d.matmul(&y, &x, &spec).unwrap()).unwrap()
    );
}

#[test]
fn lstm_sequence_kernels_refuse_hidden_sizes_they_cannot_take() {
    use kiln::device::{LstmForward, LstmShape};
    let d = device();
    let shape = LstmShape {
        steps: 2,
        batch: 2,
        hidden: 3,
    };
    assert!(!d.lstm_sequence_fits(&shape));
    let buffer = |n: usize| d.upload(&random_vec(n, 70 + n as u64, -1.0, 1.0)).unwrap();
    let (gates, states, mask) = (buffer(2 * 2 * 12), buffer(3 * 2 * 3), buffer(2 * 2));
    let (w_hh, bias) = (buffer(3 * 12), buffer(12));
    let forward = LstmForward {
        xproj: &gates,
        bias: &bias,
        mask: &mask,
        gates: &gates,
        cells: &states,
        states: &states,
    };
    let err = d
        .lstm_forward_sequence(&shape, &w_hh, &forward)
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiple of 4 units"), "{err}");
    // A batch of more row groups than one grid dimension holds takes the
    // step kernels (2-D grids) instead; a sequence kernel would be refused
    // by the dispatch.
    let max = d.limits().max_compute_workgroups_per_dimension as usize;
    let fits = |batch| {
        d.lstm_sequence_fits(&LstmShape {
            steps: 2,
            batch,
            hidden: 8,
        })
    };
    assert!(fits(64));
    // 128 rows a workgroup at most (a CPU adapter's, at 8 units), 8 on GPUs.
    assert!(!fits(max * 128 + 1));
}

#[test]
fn lstms_take_the_sequence_kernels_only_with_kernels_for_cpu_adapters() {
    use kiln::device::LstmShape;
    let d = device();
    let shape = LstmShape {
        steps: 20,
        batch: 32,
        hidden: 64,
    };
    assert!(d.lstm_sequence_fits(&shape));
    // The sequence kernels' few workgroups fill a CPU's cores and leave a
    // GPU idle (see `Device::lstm_prefers_sequence`); a setting decides
    // instead, which CI uses to check the GPU class's sequence kernels.
    let expected = common::setting_or("KILN_LSTM_SEQUENCE", d.kernels_for_cpu());
    assert_eq!(d.lstm_prefers_sequence(&shape), expected);
    // Hidden sizes the sequence kernels cannot take run step by step anyway.
    let odd = LstmShape { hidden: 6, ..shape };
    assert!(!d.lstm_prefers_sequence(&odd));
}
