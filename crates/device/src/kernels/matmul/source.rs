//! The WGSL of the matrix-product kernels: a tiling's template from
//! `shaders/`, specialised with its constants, and the parts generated per
//! tiling (accumulators, the unrolled multiply of a k step, the store),
//! the operands' loaders and the optional epilogue and column sums.

use super::{Epilogue, EpilogueOperand, Extras, HalfLoads, Operands};
use crate::buffer::DType;
use crate::device::TEXTURE_ROW_TEXELS;
use crate::kernel::Specialize;
use crate::kernels::EXPR_HELPERS;
use crate::tuning::MatmulTiling;
use std::fmt::Write;

const PARAMS_SRC: &str = include_str!("../../../../../shaders/matmul_params.wgsl");
const REGISTER_SRC: &str = include_str!("../../../../../shaders/matmul_register.wgsl");
const REGISTER_VEC4_SRC: &str = include_str!("../../../../../shaders/matmul_register_vec4.wgsl");
const SUBGROUP_SRC: &str = include_str!("../../../../../shaders/matmul_subgroup.wgsl");
const SHARED_SRC: &str = include_str!("../../../../../shaders/matmul_shared.wgsl");
const SHARED_VEC4_SRC: &str = include_str!("../../../../../shaders/matmul_shared_vec4.wgsl");

/// WGSL `fn epilogue(v, index, col)`, which every kernel applies to what it
/// stores at `c[index]` (column `col`): the identity, or the epilogue's
/// expression with its operand at binding 4.
fn epilogue_source(epilogue: Option<&Epilogue>) -> String {
    let Some(e) = epilogue else {
        return "fn epilogue(v: f32, index: u32, col: u32) -> f32 {\n    return v;\n}\n".into();
    };
    let x1 = match e.operand {
        EpilogueOperand::Column(_) => "operand[col]",
        EpilogueOperand::Element(_) => "operand[index]",
    };
    let mut s = format!(
        "{EXPR_HELPERS}\n@group(0) @binding(4) var<storage, read> operand: array<f32>;\n\n\
         fn epilogue(v: f32, index: u32, col: u32) -> f32 {{\n    let x0 = v;\n    let x1 = {x1};\n"
    );
    for (i, value) in e.op.scalars.iter().enumerate() {
        let _ = writeln!(s, "    let s{i} = bitcast<f32>({:#x}u);", value.to_bits());
    }
    let _ = writeln!(s, "    return {};\n}}", e.op.expr);
    s
}

/// WGSL `fn c_index(row, col)`: where C's element goes within its batch
/// entry, row-major or in planes of `plane` rows.
fn c_index_source(plane: Option<usize>) -> String {
    let body = match plane {
        None => "row * p.n + col".to_string(),
        Some(plane) => format!("(row / {plane}u * p.n + col) * {plane}u + row % {plane}u"),
    };
    format!("fn c_index(row: u32, col: u32) -> u32 {{\n    return {body};\n}}\n")
}

/// The WGSL that sums columns `col0 + j` of op(B) over k into `column_sums`
/// (bound after the epilogue's operand), for the invocations where `first` holds,
/// each taking the columns of the loop header `columns`. B is f32 storage,
/// read one element at a time whatever the kernel's loads.
fn column_sums_source(
    binding: u32,
    first: &str,
    columns: &str,
    ops: &Operands,
    trans_b: bool,
) -> (String, String) {
    let declaration = format!(
        "@group(0) @binding({binding}) var<storage, read_write> column_sums: array<f32>;\n"
    );
    let index = if trans_b {
        "col * p.k + kk"
    } else {
        "kk * p.n + col"
    };
    let element = if ops.b_texture {
        "load_b(i >> 2u)[i & 3u]"
    } else if ops.vec4 {
        "b[i >> 2u][i & 3u]"
    } else {
        "b[i]"
    };
    let block = format!(
        "    if ({first}) {{\n        \
         for ({columns}) {{\n            \
         let col = col0 + j;\n            \
         if (col < p.n) {{\n                \
         var total = 0.0;\n                \
         for (var kk = 0u; kk < p.k; kk++) {{\n                    \
         let i = {index};\n                    \
         total += {element};\n                \
         }}\n                \
         column_sums[col] = total;\n            \
         }}\n        \
         }}\n    \
         }}\n"
    );
    (declaration, block)
}

/// The binding of operand `name` and its loader `load_<name>(i)`, returning
/// element `i` (or the `i`-th group of four, for vec4 loads) as f32, or as
/// `vec4<f16>` for f16 arithmetic.
fn operand_source(name: &str, binding: u32, dtype: DType, ops: &Operands) -> String {
    if (name == "a" && ops.a_texture) || (name == "b" && ops.b_texture) {
        let mask = TEXTURE_ROW_TEXELS - 1;
        let shift = TEXTURE_ROW_TEXELS.trailing_zeros();
        return format!(
            "@group(0) @binding({binding}) var {name}: texture_2d<f32>;\n\
             fn load_{name}(i: u32) -> vec4<f32> {{\n    \
             return textureLoad({name}, vec2<u32>(i & {mask}u, i >> {shift}u), 0);\n}}\n"
        );
    }
    let (element, body) = match (dtype, ops.vec4, ops.half) {
        (DType::F16, true, HalfLoads::NativeArithmetic) => ("vec4<f16>", format!("{name}[i]")),
        (DType::F16, false, _) if ops.native_half() => ("f16", format!("f32({name}[i])")),
        (DType::F16, true, _) if ops.native_half() => ("vec4<f16>", format!("vec4<f32>({name}[i])")),
        (DType::F16, false, HalfLoads::Packed) => (
            "u32",
            format!("select(unpack2x16float({name}[i >> 1u]).x, unpack2x16float({name}[i >> 1u]).y, (i & 1u) == 1u)"),
        ),
        (DType::F16, true, HalfLoads::Packed) => (
            "vec2<u32>",
            format!("vec4<f32>(unpack2x16float({name}[i].x), unpack2x16float({name}[i].y))"),
        ),
        (_, false, _) => ("f32", format!("{name}[i]")),
        (_, true, _) => ("vec4<f32>", format!("{name}[i]")),
    };
    let value = match (ops.vec4, ops.half_arithmetic()) {
        (true, true) => "vec4<f16>",
        (true, false) => "vec4<f32>",
        _ => "f32",
    };
    format!(
        "@group(0) @binding({binding}) var<storage, read> {name}: array<{element}>;\n\
         fn load_{name}(i: u32) -> {value} {{\n    return {body};\n}}\n"
    )
}

pub(super) fn specialise(
    tiling: MatmulTiling,
    trans_a: bool,
    trans_b: bool,
    ops: Operands,
    extras: Extras,
) -> String {
    let vec4 = ops.vec4;
    // Column sums bind after the epilogue's operand; tilings without a block
    // for them are never asked (see `Device::matmul_column_sums`).
    let sums_binding = if extras.epilogue.is_some() { 5 } else { 4 };
    let column_sums = |first: &str, columns: &str| match extras.column_sums {
        Some(_) => column_sums_source(sums_binding, first, columns, &ops, trans_b),
        None => (String::new(), String::new()),
    };
    let mut declarations = String::new();
    let spec = match tiling {
        MatmulTiling::Register { tm, tn, wg_x, wg_y } => {
            let (source, offsets, step) = if vec4 {
                let step = if ops.half_arithmetic() {
                    vec4_half_step(tm, tn, trans_a, trans_b)
                } else {
                    vec4_step(tm, tn, trans_a, trans_b)
                };
                (
                    REGISTER_VEC4_SRC,
                    vec4_offsets(tm, tn, trans_a, trans_b),
                    step,
                )
            } else {
                (
                    REGISTER_SRC,
                    register_offsets(tm, tn),
                    register_step(tm, tn),
                )
            };
            // Each invocation of the first row block sums its own columns.
            let (declaration, sums) = column_sums("row0 == 0u", "var j = 0u; j < TN; j++");
            declarations = declaration;
            Specialize::new(source)
                .constant_u32("TM", tm)
                .constant_u32("TN", tn)
                .constant_u32("WG_X", wg_x)
                .constant_u32("WG_Y", wg_y)
                .replace("OFFSETS", &offsets)
                .replace("STEP", &step)
                .replace("COLUMN_SUMS", &sums)
                .replace("STORE", &register_store(tm, tn))
        }
        MatmulTiling::Subgroup { tm, sg, wg } => {
            // The lanes of the first workgroup of rows share its columns.
            let (declaration, sums) =
                column_sums("wid.y + p.y0 == 0u", "var j = lid.x; j < TN; j += WG");
            declarations = declaration;
            Specialize::new(SUBGROUP_SRC)
                .constant_u32("TM", tm)
                .constant_u32("TN", 4 * sg)
                .constant_u32("SG", sg)
                .constant_u32("WG", wg)
                .replace("OFFSETS", &subgroup_offsets(tm, 4 * sg, trans_a, trans_b))
                .replace("STEP", &subgroup_step(tm, 4 * sg, trans_a, trans_b))
                .replace("COLUMN_SUMS", &sums)
                .replace("STORE", &register_store(tm, 4 * sg))
        }
        MatmulTiling::Shared {
            bm,
            bn,
            bk,
            tm,
            tn,
            pipelined,
            ..
        } => {
            let threads = (bn / tn) * (bm / tm);
            // Both kernels: the block, its depth, each invocation's tile.
            let both = Specialize::new(if vec4 { SHARED_VEC4_SRC } else { SHARED_SRC })
                .constant_u32("BM", bm)
                .constant_u32("BN", bn)
                .constant_u32("BK", bk)
                .constant_u32("TM", tm)
                .constant_u32("TN", tn)
                .constant_u32("WG_X", bn / tn)
                .constant_u32("WG_Y", bm / tm)
                .constant_u32("THREADS", threads);
            if vec4 {
                both.constant_u32("BM4", bm / 4)
                    .constant_u32("BN4", bn / 4)
                    .constant_u32("BK4", bk / 4)
                    .constant_u32("TM4", tm / 4)
                    .constant_u32("TN4", tn / 4)
                    .constant_u32("A_FETCHES", (bk * bm / 4).div_ceil(threads))
                    .constant_u32("B_FETCHES", (bk * bn / 4).div_ceil(threads))
                    .constant_bool("PIPELINED", pipelined)
                    .constant_u32("STAGES", if pipelined { 2 } else { 1 })
                    .constant_bool("HALF_MATH", ops.half_arithmetic())
                    .alias("Tile", if ops.half_arithmetic() { "f16" } else { "f32" })
                    .replace("ACCUMULATORS", &shared_accumulators(tm / 4, tn / 4))
                    .replace(
                        "MULTIPLY",
                        &shared_multiply(tm / 4, tn / 4, ops.half_arithmetic()),
                    )
                    .replace("STORE", &shared_store(tm / 4, tn / 4))
            } else {
                both.replace("ACCUMULATORS", &shared_scalar_accumulators(tm, tn))
                    .replace("MULTIPLY", &shared_scalar_multiply(tm, tn))
                    .replace("STORE", &shared_scalar_store(tm, tn))
            }
        }
    };
    let body = spec
        .constant_bool("TRANS_A", trans_a)
        .constant_bool("TRANS_B", trans_b)
        .build();
    // `enable` must open the module.
    let enable = if ops.native_half() {
        "enable f16;\n"
    } else {
        ""
    };
    let a = operand_source("a", 1, ops.a, &ops);
    let b = operand_source("b", 2, ops.b, &ops);
    let epilogue = epilogue_source(extras.epilogue);
    let c_index = c_index_source(extras.plane);
    format!("{enable}{PARAMS_SRC}\n{a}{b}\n{epilogue}\n{c_index}\n{declarations}\n{body}")
}

const LANES: [&str; 4] = ["x", "y", "z", "w"];

fn zeroed_accumulators(s: &mut String, tm: u32, tn: u32) {
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "    var acc_{i}_{j} = 0.0;");
        }
    }
}

/// vec4 start indices: per row of A (along k) or per group of four rows (along
/// m, when A is transposed); likewise per column or column group of B.
fn vec4_offsets(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_a_offsets(tm, trans_a);
    if trans_b {
        for j in 0..tn {
            let _ = writeln!(
                s,
                "    let b_off_{j} = (b_base + min(col0 + {j}u, p.n - 1u) * p.k) / 4u;"
            );
        }
    } else {
        for q in 0..tn / 4 {
            let _ = writeln!(
                s,
                "    let b_off_{q} = (b_base + min(col0 + {}u, p.n - 4u)) / 4u;",
                4 * q
            );
        }
    }
    zeroed_accumulators(&mut s, tm, tn);
    s
}

/// vec4 start indices of A's rows (along k), or of groups of four rows (along m)
/// when A is transposed.
fn vec4_a_offsets(tm: u32, trans_a: bool) -> String {
    let mut s = String::new();
    if trans_a {
        for g in 0..tm / 4 {
            let _ = writeln!(
                s,
                "    let a_off_{g} = (a_base + min(row0 + {}u, p.m - 4u)) / 4u;",
                4 * g
            );
        }
    } else {
        for i in 0..tm {
            let _ = writeln!(
                s,
                "    let a_off_{i} = (a_base + min(row0 + {i}u, p.m - 1u) * p.k) / 4u;"
            );
        }
    }
    s
}

/// The vec4 loads of A and B for four k steps.
fn vec4_loads(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_a_loads(tm, trans_a);
    if trans_b {
        for j in 0..tn {
            let _ = writeln!(s, "        let b_{j} = load_b(b_off_{j} + kq);");
        }
    } else {
        for t in 0..4 {
            for q in 0..tn / 4 {
                let _ = writeln!(
                    s,
                    "        let b_{t}_{q} = load_b(b_off_{q} + (4u * kq + {t}u) * n4);"
                );
            }
        }
    }
    s
}

/// Four k steps: vec4 loads, then 4 * TM * TN multiply-adds on their lanes,
/// accumulator by accumulator (as in [`subgroup_step`], so a spilled one is
/// loaded and stored once per four k steps: `register:16x16:8x4` at N=1024
/// went from 16 to 17-18 GFLOP/s on lavapipe, 16.6 to 18.2 on llvmpipe's GL).
fn vec4_step(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_loads(tm, tn, trans_a, trans_b);
    for i in 0..tm {
        for j in 0..tn {
            for (t, lane_t) in LANES.iter().enumerate() {
                let a_val = vec4_a_value(i, t, trans_a);
                let b_val = if trans_b {
                    format!("b_{j}.{lane_t}")
                } else {
                    format!("b_{t}_{}.{}", j / 4, LANES[(j % 4) as usize])
                };
                let _ = writeln!(
                    s,
                    "        acc_{i}_{j} = fma({a_val}, {b_val}, acc_{i}_{j});"
                );
            }
        }
    }
    s
}

/// Four k steps in f16 arithmetic: the same loads as [`vec4_step`] (as
/// `vec4<f16>`), then per output one four-term f16 `dot` added to the f32
/// accumulator. Operands loaded along m or n are regathered into vectors
/// along k first.
fn vec4_half_step(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_loads(tm, tn, trans_a, trans_b);
    let along_k = |parts: [String; 4]| format!("vec4<f16>({})", parts.join(", "));
    for i in 0..tm {
        let a_row = if trans_a {
            along_k(std::array::from_fn(|t| vec4_a_value(i, t, true)))
        } else {
            format!("a_{i}")
        };
        let _ = writeln!(s, "        let ak_{i} = {a_row};");
    }
    for j in 0..tn {
        let b_col = if trans_b {
            format!("b_{j}")
        } else {
            along_k(std::array::from_fn(|t| {
                format!("b_{t}_{}.{}", j / 4, LANES[(j % 4) as usize])
            }))
        };
        let _ = writeln!(s, "        let bk_{j} = {b_col};");
    }
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "        acc_{i}_{j} += f32(dot(ak_{i}, bk_{j}));");
        }
    }
    s
}

/// The vec4 loads of A for four k steps.
fn vec4_a_loads(tm: u32, trans_a: bool) -> String {
    let mut s = String::new();
    if trans_a {
        for t in 0..4 {
            for g in 0..tm / 4 {
                let _ = writeln!(
                    s,
                    "        let a_{t}_{g} = load_a(a_off_{g} + (4u * kq + {t}u) * m4);"
                );
            }
        }
    } else {
        for i in 0..tm {
            let _ = writeln!(s, "        let a_{i} = load_a(a_off_{i} + kq);");
        }
    }
    s
}

/// A's value for row `i` at k step `t` of a four-step chunk.
fn vec4_a_value(i: u32, t: usize, trans_a: bool) -> String {
    if trans_a {
        format!("a_{t}_{}.{}", i / 4, LANES[(i % 4) as usize])
    } else {
        format!("a_{i}.{}", LANES[t])
    }
}

/// Offsets for the subgroup kernel: A as in the vec4 kernel; B at the four
/// columns this lane loads for the subgroup.
fn subgroup_offsets(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_a_offsets(tm, trans_a);
    if trans_b {
        for cc in 0..4 {
            let _ = writeln!(
                s,
                "    let b_off_{cc} = (b_base + min(my_col + {cc}u, p.n - 1u) * p.k) / 4u;"
            );
        }
    } else {
        let _ = writeln!(s, "    let b_off = (b_base + min(my_col, p.n - 4u)) / 4u;");
    }
    zeroed_accumulators(&mut s, tm, tn);
    s
}

/// Four k steps of the subgroup kernel: this lane's vec4 loads, then column by
/// column the four broadcasts of that column's B values from the lane that
/// loaded them and the column's `4 * tm` multiply-adds.
///
/// Column by column, not k step by k step: the `tm * tn` accumulators do not
/// fit in registers, and this order loads and stores each spilled one once
/// per four k steps instead of four times. On lavapipe it took the f32
/// product at N=1024 from about 43 to 53 GFLOP/s.
fn subgroup_step(tm: u32, tn: u32, trans_a: bool, trans_b: bool) -> String {
    let mut s = vec4_a_loads(tm, trans_a);
    for t in 0..4 {
        let _ = if trans_b {
            writeln!(s, "        let bl_{t} = load_b(b_off_{t} + kq);")
        } else {
            writeln!(
                s,
                "        let bl_{t} = load_b(b_off + (4u * kq + {t}u) * n4);"
            )
        };
    }
    for j in 0..tn {
        for (t, lane_t) in LANES.iter().enumerate() {
            let local = if trans_b {
                format!("bl_{}.{lane_t}", j % 4)
            } else {
                format!("bl_{t}.{}", LANES[(j % 4) as usize])
            };
            let _ = writeln!(
                s,
                "        let bv_{t}_{j} = subgroupBroadcast({local}, {}u);",
                j / 4
            );
        }
        for i in 0..tm {
            for t in 0..4 {
                let a_val = vec4_a_value(i, t, trans_a);
                let _ = writeln!(
                    s,
                    "        acc_{i}_{j} = fma({a_val}, bv_{t}_{j}, acc_{i}_{j});"
                );
            }
        }
    }
    s
}

/// Clamped start offsets of the TM rows of A and TN columns of B, and zeroed
/// accumulators.
fn register_offsets(tm: u32, tn: u32) -> String {
    let mut s = String::new();
    for i in 0..tm {
        let _ = writeln!(
            s,
            "    let r_{i} = min(row0 + {i}u, p.m - 1u);\n    \
             let a_off_{i} = a_base + select(r_{i} * p.k, r_{i}, TRANS_A);"
        );
    }
    for j in 0..tn {
        let _ = writeln!(
            s,
            "    let c_{j} = min(col0 + {j}u, p.n - 1u);\n    \
             let b_off_{j} = b_base + select(c_{j}, c_{j} * p.k, TRANS_B);"
        );
    }
    zeroed_accumulators(&mut s, tm, tn);
    s
}

/// One k step: TM + TN loads, TM * TN multiply-adds.
fn register_step(tm: u32, tn: u32) -> String {
    let mut s = String::new();
    for i in 0..tm {
        let _ = writeln!(s, "        let a_{i} = load_a(a_off_{i} + ak);");
    }
    for j in 0..tn {
        let _ = writeln!(s, "        let b_{j} = load_b(b_off_{j} + bk);");
    }
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "        acc_{i}_{j} += a_{i} * b_{j};");
        }
    }
    s
}

/// The shared-memory vec4 kernel's accumulators: `acc_i_e_j` holds row
/// `e` of the invocation's row quad `i` and its column quad `j`.
fn shared_accumulators(tm4: u32, tn4: u32) -> String {
    let mut s = String::new();
    for i in 0..tm4 {
        for e in 0..4 {
            for j in 0..tn4 {
                let _ = writeln!(s, "    var acc_{i}_{e}_{j} = vec4<f32>(0.0);");
            }
        }
    }
    s
}

/// The shared-memory vec4 kernel's multiply of one staged k tile (k steps
/// `sk` on of `a_tiles` and `b_tiles`): a loop over the tile's
/// depth, unrolled inside over the invocation's quads. With `half`, each
/// four k steps of an output are an f16 multiply-add chain added to its f32
/// accumulator, so that loop takes four k steps at a time. (Unrolling the
/// depth as well made the kernels compile 1.5-2.5 times slower on lavapipe,
/// which runs them in CI, to save one loop test per 16 to 64 multiply-adds.)
fn shared_multiply(tm4: u32, tn4: u32, half: bool) -> String {
    // The invocation's column quads of B and row quads of A at k step `kk`,
    // named with `t`.
    let loads = |s: &mut String, kk: &str, t: &str| {
        let step = format!("[sk + {kk}]");
        tile_reads(
            s,
            &format!("b{t}"),
            tn4,
            &format!("b_tiles{step}"),
            "lid.x",
            "WG_X",
        );
        tile_reads(
            s,
            &format!("a{t}"),
            tm4,
            &format!("a_tiles{step}"),
            "lid.y",
            "WG_Y",
        );
    };
    let each_output = |s: &mut String, out: &dyn Fn(&str, u32, &str, u32) -> String| {
        for i in 0..tm4 {
            for (e, lane) in LANES.iter().enumerate() {
                for j in 0..tn4 {
                    let acc = format!("acc_{i}_{e}_{j}");
                    let _ = writeln!(s, "            {}", out(&acc, i, lane, j));
                }
            }
        }
    };
    let mut s = String::new();
    if half {
        s.push_str("        for (var k4 = 0u; k4 < BK; k4 += 4u) {\n");
        for t in 0..4 {
            loads(&mut s, &format!("k4 + {t}u"), &t.to_string());
        }
        each_output(&mut s, &|acc, i, lane, j| {
            let mut part = "vec4<Tile>(0.0)".to_string();
            for t in 0..4 {
                part = format!("fma(vec4<Tile>(a{t}_{i}.{lane}), b{t}_{j}, {part})");
            }
            format!("{acc} += vec4<f32>({part});")
        });
    } else {
        s.push_str("        for (var kk = 0u; kk < BK; kk++) {\n");
        loads(&mut s, "kk", "");
        each_output(&mut s, &|acc, i, lane, j| {
            format!("{acc} = fma(vec4<f32>(a_{i}.{lane}), b_{j}, {acc});")
        });
    }
    s.push_str("        }\n");
    s
}

/// Stores the shared-memory vec4 kernel's accumulators, row by row, through
/// the epilogue (`store_quad` skips what lies past the edge).
fn shared_store(tm4: u32, tn4: u32) -> String {
    let mut s = String::new();
    for i in 0..tm4 {
        for e in 0..4 {
            let _ = writeln!(
                s,
                "    {{\n        let r = row_base + 4u * (lid.y + {i}u * WG_Y) + {e}u;\n        if (r < p.m) {{"
            );
            for j in 0..tn4 {
                let _ = writeln!(
                    s,
                    "            store_quad(c_base, r, col_base + 4u * (lid.x + {j}u * WG_X), acc_{i}_{e}_{j});"
                );
            }
            s.push_str("        }\n    }\n");
        }
    }
    s
}

/// Declares `{name}_{q}` for `q < count`: what the invocation reads from
/// one k step `step` of a k-major shared-memory tile (an array), its `q`-th
/// element (or quad) at `{step}[{first} + q * {stride}]`.
fn tile_reads(s: &mut String, name: &str, count: u32, step: &str, first: &str, stride: &str) {
    for q in 0..count {
        let _ = writeln!(
            s,
            "            let {name}_{q} = {step}[{first} + {q}u * {stride}];"
        );
    }
}

/// The scalar shared-memory kernel's accumulators: `acc_i_j` for the
/// invocation's row `i` and column `j`.
fn shared_scalar_accumulators(tm: u32, tn: u32) -> String {
    let mut s = String::new();
    zeroed_accumulators(&mut s, tm, tn);
    s
}

/// The scalar shared-memory kernel's multiply of one staged k tile: a loop
/// over its depth, unrolled inside over the invocation's rows and columns.
fn shared_scalar_multiply(tm: u32, tn: u32) -> String {
    let mut s = String::from("        for (var kk = 0u; kk < BK; kk++) {\n");
    tile_reads(&mut s, "a", tm, "a_tile[kk]", "lid.y", "WG_Y");
    tile_reads(&mut s, "b", tn, "b_tile[kk]", "lid.x", "WG_X");
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(s, "            acc_{i}_{j} += a_{i} * b_{j};");
        }
    }
    s.push_str("        }\n");
    s
}

/// Stores the scalar shared-memory kernel's accumulators through the
/// epilogue (`store_one` skips what lies outside C).
fn shared_scalar_store(tm: u32, tn: u32) -> String {
    let mut s = String::new();
    for i in 0..tm {
        for j in 0..tn {
            let _ = writeln!(
                s,
                "    store_one(c_base, row_base + lid.y + {i}u * WG_Y, col_base + lid.x + {j}u * WG_X, acc_{i}_{j});"
            );
        }
    }
    s
}

/// Stores the named accumulators `acc_i_j` to C through the epilogue, in one
/// loop over an array of them rather than `tm * tn` unrolled stores. On
/// lavapipe the loop measured 10-20% faster on large products (the unrolled
/// stores' code size hurts the main loop), and the epilogue is compiled once
/// rather than per store (an inlined GELU per store took half a minute to
/// compile). The subgroup and register tilings that use it are CPU-adapter
/// kernels; the shared-memory one stores from an array loop already.
fn register_store(tm: u32, tn: u32) -> String {
    let values: Vec<String> = (0..tm)
        .flat_map(|i| (0..tn).map(move |j| format!("acc_{i}_{j}")))
        .collect();
    let count = tm * tn;
    format!(
        "    var tile = array<f32, {count}>({});\n    \
         for (var e = 0u; e < {count}u; e++) {{\n        \
         let row = row0 + e / {tn}u;\n        \
         let col = col0 + e % {tn}u;\n        \
         if (row < p.m && col < p.n) {{\n            \
         let index = c_base + c_index(row, col);\n            \
         c[index] = epilogue(tile[e], index, col);\n        \
         }}\n    \
         }}\n",
        values.join(", ")
    )
}
