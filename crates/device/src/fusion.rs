//! Fusion: kernels launched together run as one dispatch of a generated
//! kernel, either side by side (kernels that do not depend on each other) or
//! as a chain of one-workgroup kernels, each stage reading what the one
//! before wrote.
//!
//! A layer's backward pass makes two independent products (the weight
//! gradient and the input gradient); attention makes three projections of the
//! same input. Each dispatch has a fixed cost (on CPU adapters a hand-off
//! between threads of tens of microseconds; on GPUs a launch and a partly
//! idle device for small products), so two small kernels in one dispatch cost
//! about one.
//!
//! The fused kernel is built from the parts' WGSL: every module-scope name of
//! part `i` gets the suffix `_k{i}`, its storage bindings are renumbered after
//! the previous parts', its parameter block becomes member `k{i}` of the fused
//! block, and its entry point becomes a plain function. The new entry point
//! gives each part a range of workgroups; inside it, a part with smaller
//! workgroups than the fused one sees several *virtual* workgroups, each with
//! the workgroup and local ids it would have had in its own dispatch.
//!
//! A chain is one workgroup that runs its stages in turn, with a storage
//! barrier between them: a small classifier head, its loss and the loss's
//! gradient take one dispatch instead of three. A buffer one part writes is
//! declared `read_write` in every part that binds it, since one dispatch
//! cannot bind a buffer both read-only and writable.
//!
//! Parts that use workgroup memory or barriers need workgroups of one size
//! (so a fused workgroup is exactly one of theirs, and every branch on the
//! part is uniform across it), and their workgroup memory must fit side by
//! side. The subgroup id builtins are not supported. Parts using subgroup
//! operations need workgroups of whole subgroups, which then stay intact.
//! Anything else unsupported makes [`fuse_sources`] refuse, and the launches
//! run one by one as before.

use crate::binding::PARAM_DECLARATION;
use std::collections::HashMap;
use std::fmt::Write;
use wgpu::naga;

/// Most kernels one fused dispatch takes.
pub(crate) const MAX_PARTS: usize = 8;

/// One part of a fused kernel, as the host must feed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PartPlan {
    /// Virtual workgroups of the part per fused workgroup.
    pub ratio: u32,
    /// Byte offset of the part's parameter block in the fused block, if it
    /// takes one.
    pub param_offset: Option<usize>,
    /// Storage bindings the part has (its buffers, in order).
    pub storage_bindings: u32,
    /// Whether it uses subgroup operations and runs as several virtual
    /// workgroups per fused one. Their ids then vary per invocation, so a
    /// CPU adapter computes all of the part's addressing lane by lane.
    pub virtual_subgroups: bool,
}

/// A fused kernel's WGSL and how to fill its parameter block.
#[derive(Clone, Debug)]
pub(crate) struct FusedSource {
    pub wgsl: String,
    pub parts: Vec<PartPlan>,
    /// Whether it is a chain, dispatched as one workgroup.
    pub chain: bool,
    /// Byte offset of `fused_grids` (per part: its grid in x, y, z and the
    /// cumulative end of its fused workgroups in w); a chain has none.
    pub grids_offset: Option<usize>,
    /// Byte offset of `fused_row` (x: fused workgroups per grid row).
    pub row_offset: usize,
    /// Size of the fused parameter block.
    pub block_bytes: usize,
}

/// What the adapter allows a fused kernel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FusionLimits {
    /// The adapter's fixed subgroup size, if it has one.
    pub subgroup_size: Option<u32>,
    pub max_invocations: u32,
    pub max_workgroup_bytes: u32,
}

/// One kernel to fuse (a Kiln kernel with entry point `main`).
#[derive(Clone, Debug)]
pub(crate) struct PartSource<'a> {
    pub wgsl: &'a str,
    /// Its stage in a chain: 0 for all parts of a side-by-side fusion; in a
    /// chain, stages count up from 0 in the order the parts run.
    pub stage: usize,
    /// Its storage bindings (numbered as in `wgsl`) that another part
    /// writes, to be declared `read_write`.
    pub written_elsewhere: Vec<u32>,
}

/// The size of a fused parameter block for parts whose own blocks take
/// `part_bytes` (as laid out by [`fuse_sources`]: each part's block 16-byte
/// aligned, a grid row per part unless chained, and `fused_row`).
pub(crate) fn block_bytes(part_bytes: impl Iterator<Item = usize>, chain: bool) -> usize {
    let (mut bytes, mut parts) = (16, 0);
    for b in part_bytes {
        bytes += b.next_multiple_of(16);
        parts += 1;
    }
    if chain {
        bytes
    } else {
        bytes + 16 * parts
    }
}

/// Builds the fused kernel of `sources`, or says why they cannot be fused.
/// A chain (a part past stage 0) runs as one workgroup; its host must launch
/// every part as one workgroup too.
pub(crate) fn fuse_sources(
    sources: &[PartSource],
    limits: FusionLimits,
) -> Result<FusedSource, String> {
    let FusionLimits {
        subgroup_size,
        max_invocations,
        max_workgroup_bytes,
    } = limits;
    if !(2..=MAX_PARTS).contains(&sources.len()) {
        return Err(format!(
            "{} parts; fusion takes 2..={MAX_PARTS}",
            sources.len()
        ));
    }
    let chain = sources.iter().any(|s| s.stage > 0);
    if sources.windows(2).any(|w| w[1].stage < w[0].stage) {
        return Err("a chain's stages must come in order".into());
    }
    let mut parts: Vec<Part> = Vec::new();
    let mut bindings = 0;
    for (i, source) in sources.iter().enumerate() {
        let part = Part::read(source, i, bindings, subgroup_size)?;
        bindings += part.storage_bindings;
        parts.push(part);
    }
    // The fused workgroup holds a whole number of every part's workgroups.
    let threads = parts.iter().fold(1u64, |l, p| lcm(l, u64::from(p.threads)));
    if threads > u64::from(max_invocations) {
        return Err(format!(
            "workgroups of {:?} invocations need fused ones of {threads}, over the adapter's {max_invocations}",
            parts.iter().map(|p| p.threads).collect::<Vec<_>>()
        ));
    }
    let threads = threads as u32;
    // Side by side, a fused workgroup branches to one part; in a chain, every
    // invocation passes through every part, so only the barriers' own parts
    // must span the whole workgroup.
    let barrier_parts_fit = if chain {
        parts
            .iter()
            .all(|p| !p.shares_workgroup || p.threads == threads)
    } else {
        !parts.iter().any(|p| p.shares_workgroup) || parts.iter().all(|p| p.threads == threads)
    };
    if !barrier_parts_fit {
        return Err("parts with barriers or workgroup memory need workgroups of one size".into());
    }
    let workgroup_bytes: u32 = parts.iter().map(|p| p.workgroup_bytes).sum();
    if workgroup_bytes > max_workgroup_bytes {
        return Err(format!(
            "{workgroup_bytes} bytes of workgroup memory, over the adapter's {max_workgroup_bytes}"
        ));
    }
    let mut directives: Vec<&str> = Vec::new();
    let mut body = String::new();
    for part in &parts {
        for d in &part.directives {
            if !directives.contains(&d.as_str()) {
                directives.push(d);
            }
        }
        body.push_str(&part.wgsl);
        body.push('\n');
    }
    let mut wgsl = String::new();
    for d in directives {
        let _ = writeln!(wgsl, "{d}");
    }
    wgsl.push_str("struct Params {\n");
    for (i, part) in parts.iter().enumerate() {
        if part.has_params {
            let _ = writeln!(wgsl, "    @align(16) k{i}: Params_k{i},");
        }
    }
    if !chain {
        let _ = writeln!(wgsl, "    fused_grids: array<vec4<u32>, {}>,", parts.len());
    }
    let _ = writeln!(wgsl, "    fused_row: vec4<u32>,\n}}\n{PARAM_DECLARATION}\n");
    wgsl.push_str(&body);
    let stages: Vec<usize> = sources.iter().map(|s| s.stage).collect();
    wgsl.push_str(&entry_point(&parts, threads, chain.then_some(&stages[..])));

    let module = naga::front::wgsl::parse_str(&wgsl)
        .map_err(|e| format!("fused kernel does not parse: {}", e.emit_to_string(&wgsl)))?;
    let (members, block_bytes) = params_layout(&module)?;
    let offset = |name: &str| {
        members
            .get(name)
            .copied()
            .ok_or_else(|| format!("fused block lacks {name}"))
    };
    let mut plans = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        plans.push(PartPlan {
            ratio: threads / part.threads,
            param_offset: part
                .has_params
                .then(|| offset(&format!("k{i}")))
                .transpose()?,
            storage_bindings: part.storage_bindings,
            virtual_subgroups: part.uses_subgroups && part.threads < threads,
        });
    }
    Ok(FusedSource {
        chain,
        grids_offset: (!chain).then(|| offset("fused_grids")).transpose()?,
        row_offset: offset("fused_row")?,
        block_bytes,
        parts: plans,
        wgsl,
    })
}

fn lcm(a: u64, b: u64) -> u64 {
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    a / gcd(a, b) * b
}

/// Byte offsets of the fused `Params` members by name, and its size.
fn params_layout(module: &naga::Module) -> Result<(HashMap<String, usize>, usize), String> {
    for (_, ty) in module.types.iter() {
        if ty.name.as_deref() != Some("Params") {
            continue;
        }
        if let naga::TypeInner::Struct { members, span } = &ty.inner {
            let offsets = members
                .iter()
                .filter_map(|m| Some((m.name.clone()?, m.offset as usize)))
                .collect();
            return Ok((offsets, *span as usize));
        }
    }
    Err("fused kernel has no Params struct".into())
}

/// One kernel's WGSL, renamed and ready to sit beside the others.
struct Part {
    index: usize,
    wgsl: String,
    directives: Vec<String>,
    threads: u32,
    /// The entry point's workgroup size.
    size: [u32; 3],
    /// The builtins the entry point takes, in order.
    builtins: Vec<naga::BuiltIn>,
    /// Whether it uses barriers or workgroup memory.
    shares_workgroup: bool,
    /// Whether it uses subgroup operations.
    uses_subgroups: bool,
    workgroup_bytes: u32,
    has_params: bool,
    storage_bindings: u32,
}

impl Part {
    fn read(
        part: &PartSource,
        index: usize,
        binding_base: u32,
        subgroup_size: Option<u32>,
    ) -> Result<Self, String> {
        let source = part.wgsl;
        let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
        let [entry] = module.entry_points.as_slice() else {
            return Err("a part must have exactly one entry point".into());
        };
        if entry.name != "main" || entry.stage != naga::ShaderStage::Compute {
            return Err("a part's entry point must be the compute shader `main`".into());
        }
        if entry.workgroup_size_overrides.is_some() {
            return Err("workgroup sizes set by overrides are not supported".into());
        }
        // What the code uses, not what its comments mention.
        let code_only: String = source
            .lines()
            .map(|line| line.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let mut shares_workgroup = code_only.contains("Barrier(");
        let mut workgroup_bytes = 0;
        let mut builtins = Vec::new();
        for arg in &entry.function.arguments {
            use naga::BuiltIn as B;
            match arg.binding {
                Some(naga::Binding::BuiltIn(
                    b @ (B::WorkGroupId
                    | B::LocalInvocationId
                    | B::LocalInvocationIndex
                    | B::GlobalInvocationId
                    | B::NumWorkGroups
                    | B::SubgroupInvocationId
                    | B::SubgroupSize),
                )) => builtins.push(b),
                _ => return Err(format!("entry argument {:?} is not supported", arg.name)),
            }
        }
        let size = entry.workgroup_size;
        let threads = size.iter().product::<u32>();
        let uses_subgroups = code_only.contains("subgroup");
        if uses_subgroups {
            match subgroup_size {
                Some(s) if threads % s == 0 => {}
                _ => {
                    return Err(format!(
                        "subgroup operations need workgroups of whole subgroups \
                         ({threads} invocations, subgroups of {subgroup_size:?})"
                    ))
                }
            }
        }
        let mut names = HashMap::new();
        let mut has_params = false;
        let mut storage_bindings = 0;
        for (_, global) in module.global_variables.iter() {
            if global.space == naga::AddressSpace::WorkGroup {
                shares_workgroup = true;
                workgroup_bytes += module.types[global.ty].inner.size(module.to_ctx());
            }
            let Some(name) = &global.name else { continue };
            match &global.binding {
                Some(b) if b.binding == 0 => has_params = true,
                Some(b) => storage_bindings = storage_bindings.max(b.binding),
                None => {}
            }
            names.insert(name.clone(), format!("{name}_k{index}"));
        }
        if has_params {
            if !source.contains(PARAM_DECLARATION) {
                return Err("binding 0 is not the usual parameter block".into());
            }
            names.insert("p".into(), format!("p.k{index}"));
        }
        let named = module
            .types
            .iter()
            .filter_map(|(_, t)| t.name.clone())
            .chain(module.constants.iter().filter_map(|(_, c)| c.name.clone()))
            .chain(module.overrides.iter().filter_map(|(_, o)| o.name.clone()))
            .chain(module.functions.iter().filter_map(|(_, f)| f.name.clone()))
            .chain(std::iter::once(entry.name.clone()));
        // Type aliases are resolved by the parser and leave no trace in the
        // module, so they are found in the text.
        let aliases = code_only.lines().filter_map(|line| {
            let rest = line.trim_start().strip_prefix("alias ")?;
            Some(
                rest.split(|c: char| c == '=' || c.is_whitespace())
                    .next()?
                    .to_string(),
            )
        });
        for name in named.chain(aliases).filter(|n| !n.starts_with("__")) {
            names.insert(name.clone(), format!("{name}_k{index}"));
        }

        let mut directives = Vec::new();
        let mut code = String::new();
        for line in source.lines() {
            let trimmed = line.trim_start();
            if ["enable ", "requires ", "diagnostic"]
                .iter()
                .any(|d| trimmed.starts_with(d))
            {
                directives.push(trimmed.to_string());
            } else {
                code.push_str(line);
                code.push('\n');
            }
        }
        let mut code = code.replacen(PARAM_DECLARATION, "", 1);
        for &binding in &part.written_elsewhere {
            code = declare_writable(&code, binding)?;
        }
        let code = renumber_bindings(&code, binding_base)?;
        let code = rename(&code, &names);
        let code = plain_function(&code, &format!("main_k{index}"))?;
        Ok(Self {
            index,
            wgsl: code,
            directives,
            threads,
            size,
            builtins,
            shares_workgroup,
            uses_subgroups,
            workgroup_bytes,
            has_params,
            storage_bindings,
        })
    }

    /// The fused entry point's branch running this part's virtual workgroup.
    fn call(&self, fused_threads: u32) -> String {
        let i = self.index;
        let ratio = fused_threads / self.threads;
        let mut s = String::new();
        let start = if i == 0 {
            "0u".to_string()
        } else {
            format!("p.fused_grids[{}].w", i - 1)
        };
        // Parts form one if/else chain (closed by `entry_point`).
        let head = if i == 0 { "    if" } else { "    } else if" };
        let _ = writeln!(s, "{head} (fused_w < p.fused_grids[{i}].w) {{");
        let _ = writeln!(s, "        let grid = p.fused_grids[{i}].xyz;");
        if ratio == 1 {
            let _ = writeln!(s, "        let v = fused_w - {start};");
            let _ = writeln!(s, "        let l = fused_l;");
        } else {
            let _ = writeln!(
                s,
                "        let v = (fused_w - {start}) * {ratio}u + fused_l / {}u;",
                self.threads
            );
            let _ = writeln!(s, "        let l = fused_l % {}u;", self.threads);
        }
        let _ = writeln!(s, "        if (v < grid.x * grid.y * grid.z) {{");
        // Divisions by runtime values cost tens of cycles per SIMD batch on
        // CPU adapters, which run even uniform code once per batch: a
        // one-dimensional grid (most launches) needs none.
        let _ = writeln!(
            s,
            "        var wid = vec3<u32>(v, 0u, 0u);\n        if (grid.y * grid.z != 1u) {{\n            wid = vec3<u32>(v % grid.x, (v / grid.x) % grid.y, v / (grid.x * grid.y));\n        }}"
        );
        s.push_str(&self.invoke());
        s.push_str("        }\n");
        s
    }

    /// A chain's block running this part as its one workgroup, on the
    /// invocations it has.
    fn chain_call(&self, fused_threads: u32) -> String {
        let mut s = String::from("    {\n        let l = fused_l;\n");
        s.push_str("        let wid = vec3<u32>(0u);\n        let grid = vec3<u32>(1u);\n");
        if self.threads < fused_threads {
            let _ = writeln!(s, "        if (l < {}u) {{", self.threads);
            s.push_str(&self.invoke());
            s.push_str("        }\n");
        } else {
            s.push_str(&self.invoke());
        }
        s.push_str("    }\n");
        s
    }

    /// Calls the part's function as invocation `l` of workgroup `wid` in a
    /// grid of `grid`.
    fn invoke(&self) -> String {
        let [x, y, z] = self.size;
        let mut s = String::new();
        if y * z == 1 {
            // `l` is below the part's size in its own or a chain's call.
            let _ = writeln!(s, "        let lid = vec3<u32>(l, 0u, 0u);");
        } else {
            let _ = writeln!(
                s,
                "        let lid = vec3<u32>(l % {x}u, (l / {x}u) % {y}u, l / {}u);",
                x * y
            );
        }
        let args: Vec<String> = self
            .builtins
            .iter()
            .map(|b| {
                use naga::BuiltIn as B;
                match b {
                    B::WorkGroupId => "wid".into(),
                    B::LocalInvocationId => "lid".into(),
                    B::LocalInvocationIndex => "l".into(),
                    B::GlobalInvocationId => format!("wid * vec3<u32>({x}u, {y}u, {z}u) + lid"),
                    B::NumWorkGroups => "grid".into(),
                    B::SubgroupInvocationId => "fused_lane".into(),
                    _ => "fused_subgroup_size".into(),
                }
            })
            .collect();
        let _ = writeln!(s, "        main_k{}({});", self.index, args.join(", "));
        s
    }
}

/// The fused entry point: which part and virtual workgroup this fused
/// workgroup runs or, for a chain (`stages` given), every part in turn with
/// a storage barrier between stages.
fn entry_point(parts: &[Part], threads: u32, stages: Option<&[usize]>) -> String {
    let subgroups = parts.iter().any(|p| {
        p.builtins.iter().any(|b| {
            matches!(
                b,
                naga::BuiltIn::SubgroupInvocationId | naga::BuiltIn::SubgroupSize
            )
        })
    });
    let mut s = format!(
        "@compute @workgroup_size({threads})\nfn main(@builtin(workgroup_id) fused_wid: vec3<u32>, @builtin(local_invocation_id) fused_lid: vec3<u32>"
    );
    if subgroups {
        s.push_str(", @builtin(subgroup_invocation_id) fused_lane: u32, @builtin(subgroup_size) fused_subgroup_size: u32");
    }
    // The workgroup is one-dimensional, so the local id's x is the index.
    // lavapipe computes `local_invocation_index` about twice as slowly: a
    // fused elementwise kernel ran at half the speed of its parts with it.
    s.push_str(") {\n    let fused_l = fused_lid.x;\n");
    match stages {
        None => {
            s.push_str("    let fused_w = fused_wid.y * p.fused_row.x + fused_wid.x;\n");
            for part in parts {
                s.push_str(&part.call(threads));
            }
            s.push_str("    }\n");
        }
        Some(stages) => {
            for (i, part) in parts.iter().enumerate() {
                if i > 0 && stages[i] != stages[i - 1] {
                    // What the last stage wrote, visible to the next.
                    s.push_str("    storageBarrier();\n");
                }
                s.push_str(&part.chain_call(threads));
            }
        }
    }
    s.push_str("}\n");
    s
}

/// `code` with storage binding `binding` declared `read_write`.
fn declare_writable(code: &str, binding: u32) -> Result<String, String> {
    let mark = format!("@binding({binding})");
    let at = code
        .find(&mark)
        .ok_or_else(|| format!("no binding {binding} to declare writable"))?;
    let open = at
        + code[at..]
            .find("var<")
            .ok_or_else(|| format!("binding {binding} is not a storage variable"))?;
    let close = open
        + code[open..]
            .find('>')
            .ok_or_else(|| format!("binding {binding} has an unclosed address space"))?;
    let space: Vec<&str> = code[open + 4..close].split(',').map(str::trim).collect();
    match space.as_slice() {
        ["storage"] | ["storage", "read"] => Ok(format!(
            "{}var<storage, read_write>{}",
            &code[..open],
            &code[close + 1..]
        )),
        ["storage", "read_write"] => Ok(code.to_string()),
        _ => Err(format!("binding {binding} is not a storage buffer")),
    }
}

/// Moves the storage bindings (1..) of a part after the `base` bindings of
/// the parts before it.
fn renumber_bindings(code: &str, base: u32) -> Result<String, String> {
    const MARK: &str = "@binding(";
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find(MARK) {
        let start = at + MARK.len();
        let len = rest[start..]
            .find(')')
            .ok_or("unclosed @binding attribute")?;
        let n: u32 = rest[start..start + len]
            .trim()
            .parse()
            .map_err(|_| format!("binding {:?} is not a number", &rest[start..start + len]))?;
        out.push_str(&rest[..start]);
        let _ = write!(out, "{}", n + base);
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Renames identifiers in `code` by `names`, leaving member accesses
/// (`x.name`), attribute names (`@name`) and struct member declarations alone.
fn rename(code: &str, names: &HashMap<String, String>) -> String {
    let bytes = code.as_bytes();
    let mut out = String::with_capacity(code.len() + code.len() / 8);
    let mut i = 0;
    // Struct bodies: a member's name opens each member.
    let mut after_struct_keyword = false;
    let mut in_struct = false;
    let mut member_name_next = false;
    // Commas inside a member's type (`array<T, N>`) do not start a member.
    let mut angle_depth = 0usize;
    let mut last_significant = b' ';
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'/' && bytes.get(i + 1) == Some(&b'/') {
            let end = code[i..].find('\n').map_or(bytes.len(), |e| i + e);
            out.push_str(&code[i..end]);
            i = end;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = &code[start..i];
            let is_member_decl = in_struct && member_name_next;
            let keep = last_significant == b'.' || last_significant == b'@' || is_member_decl;
            if is_member_decl {
                member_name_next = false;
            }
            match names.get(word) {
                Some(new) if !keep => out.push_str(new),
                _ => out.push_str(word),
            }
            after_struct_keyword = word == "struct" || (after_struct_keyword && !in_struct);
            last_significant = b'a';
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'.')
            {
                i += 1;
            }
            out.push_str(&code[start..i]);
            last_significant = b'0';
            continue;
        }
        match c {
            b'{' if after_struct_keyword => {
                in_struct = true;
                member_name_next = true;
                after_struct_keyword = false;
            }
            b'}' if in_struct => in_struct = false,
            b'<' if in_struct => angle_depth += 1,
            b'>' if in_struct => angle_depth = angle_depth.saturating_sub(1),
            b',' if in_struct && angle_depth == 0 => member_name_next = true,
            _ => {}
        }
        if !c.is_ascii_whitespace() {
            last_significant = c;
        }
        // Characters copied one at a time; WGSL identifiers are ASCII, and
        // anything else (comments aside) passes through unchanged.
        let ch_len = code[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&code[i..i + ch_len]);
        i += ch_len;
    }
    out
}

/// Turns the entry point `name` into a plain function: drops its stage and
/// workgroup-size attributes and its parameters' builtin attributes.
fn plain_function(code: &str, name: &str) -> Result<String, String> {
    let header = format!("fn {name}(");
    let at = code
        .find(&header)
        .ok_or_else(|| format!("entry point {name} not found"))?;
    // Attributes before `fn`: from the end of the previous declaration.
    let attrs_start = code[..at].rfind(['}', ';']).map_or(0, |e| e + 1);
    let attrs = remove_attributes(&code[attrs_start..at], &["compute", "workgroup_size"]);
    let params_start = at + header.len();
    let params_end = params_start
        + matching_paren(&code[params_start..])
            .ok_or_else(|| format!("unbalanced parameters of {name}"))?;
    let params = remove_attributes(&code[params_start..params_end], &["builtin"]);
    Ok(format!(
        "{}{attrs}{header}{params}{}",
        &code[..attrs_start],
        &code[params_end..]
    ))
}

/// `text` without the attributes `@name` / `@name(...)` for each name.
fn remove_attributes(text: &str, names: &[&str]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('@') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let word_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let word = &after[..word_len];
        let mut end = at + 1 + word_len;
        if rest[end..].trim_start().starts_with('(') {
            let open = end + rest[end..].find('(').expect("checked");
            end = open + 1 + matching_paren(&rest[open + 1..]).unwrap_or(rest.len() - open - 1) + 1;
        }
        if names.contains(&word) {
            // Also the space after it.
            while rest[end..].starts_with(' ') {
                end += 1;
            }
        } else {
            out.push_str(&rest[at..end]);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Index of the `)` closing a parenthesis opened just before `text`.
fn matching_paren(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some(i),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// y = a * x + p.shift over 2-D workgroups of 4 x 2.
    const SCALE: &str = "struct Params {\n    n: u32,\n    shift: f32,\n}\n\
        @group(0) @binding(0) var<uniform> p: Params;\n\
        @group(0) @binding(1) var<storage, read> x: array<f32>;\n\
        @group(0) @binding(2) var<storage, read_write> y: array<f32>;\n\
        const a: f32 = 2.0;\n\
        alias Real = f32;\n\
        fn scaled(v: Real) -> Real {\n    return a * v + p.shift;\n}\n\
        @compute @workgroup_size(4, 2)\n\
        fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {\n\
        \x20   let i = gid.y * n.x * 4u + gid.x;\n\
        \x20   if (i < p.n) {\n        y[i] = scaled(x[i]);\n    }\n}\n";

    /// A kernel sharing every name with `SCALE`, with 32-lane workgroups.
    const SUM: &str = "struct Params {\n    n: u32,\n    pad: array<u32, 3>,\n}\n\
        @group(0) @binding(0) var<uniform> p: Params;\n\
        alias Real = f32;\n\
        @group(0) @binding(1) var<storage, read_write> x: array<Real>;\n\
        @compute @workgroup_size(32)\n\
        fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) l: u32) {\n\
        \x20   let i = wid.x * 32u + l;\n    if (i < p.n) {\n        x[i] = x[i] + 1.0;\n    }\n}\n";

    fn beside<'a>(sources: &[&'a str]) -> Vec<PartSource<'a>> {
        sources
            .iter()
            .map(|wgsl| PartSource {
                wgsl,
                stage: 0,
                written_elsewhere: Vec::new(),
            })
            .collect()
    }

    fn limits(subgroup_size: Option<u32>, max_invocations: u32) -> FusionLimits {
        FusionLimits {
            subgroup_size,
            max_invocations,
            max_workgroup_bytes: 16384,
        }
    }

    #[test]
    fn parts_keep_their_names_apart_and_their_bindings_follow_each_other() {
        let fused = fuse_sources(&beside(&[SCALE, SUM]), limits(None, 256)).unwrap();
        let w = &fused.wgsl;
        assert!(w.contains("struct Params_k0 {\n    n: u32,"), "{w}");
        assert!(w.contains("var<storage, read> x_k0"), "{w}");
        assert!(
            w.contains("@group(0) @binding(3) var<storage, read_write> x_k1"),
            "{w}"
        );
        assert!(w.contains("return a_k0 * v + p.k0.shift;"), "{w}");
        // Type aliases are module-scope names too.
        assert!(w.contains("fn scaled_k0(v: Real_k0) -> Real_k0"), "{w}");
        assert!(w.contains("array<Real_k1>"), "{w}");
        naga::front::wgsl::parse_str(w).unwrap();
        assert!(
            w.contains("fn main_k0(gid: vec3<u32>, n: vec3<u32>)"),
            "{w}"
        );
        assert!(w.contains("@workgroup_size(32)"), "{w}");
        // The 4 x 2 part runs four virtual workgroups per fused one.
        assert_eq!(fused.parts[0].ratio, 4);
        assert_eq!(fused.parts[1].ratio, 1);
        assert_eq!(fused.parts[0].storage_bindings, 2);
        assert_eq!(fused.parts[1].param_offset, Some(16));
        assert!(fused.block_bytes >= fused.row_offset + 16);
        // The host's estimate is the layout naga computes.
        let part_bytes = [8, 16].into_iter();
        assert_eq!(block_bytes(part_bytes, false), fused.block_bytes);
    }

    #[test]
    fn refuses_what_it_cannot_fuse() {
        // Barriers and workgroup memory: only beside workgroups of one size,
        // and only as much memory as the adapter has.
        let barrier = SUM.replace("let i =", "workgroupBarrier();\n    let i =");
        let fused = fuse_sources(&beside(&[SCALE, &barrier]), limits(None, 256));
        assert!(fused.unwrap_err().contains("one size"));
        let same_size = SCALE.replace("@workgroup_size(4, 2)", "@workgroup_size(8, 4)");
        assert!(fuse_sources(&beside(&[&same_size, &barrier]), limits(None, 256)).is_ok());
        let shared = barrier.replace(
            "@compute",
            "var<workgroup> tile: array<f32, 3072>;\n@compute",
        );
        let fused = fuse_sources(&beside(&[&shared, &shared]), limits(None, 256));
        assert!(fused.unwrap_err().contains("24576 bytes"));
        let odd = SUM.replace("@workgroup_size(32)", "@workgroup_size(12)");
        assert_eq!(
            fuse_sources(&beside(&[SCALE, &odd]), limits(None, 256))
                .unwrap()
                .parts[1]
                .ratio,
            2
        );
        assert!(fuse_sources(&beside(&[SCALE, &odd]), limits(None, 16))
            .unwrap_err()
            .contains("over"));
        assert!(fuse_sources(&beside(&[SCALE]), limits(None, 256)).is_err());
        let subgroup = SUM.replace("x[i] + 1.0", "subgroupAdd(x[i])");
        assert!(fuse_sources(&beside(&[SCALE, &subgroup]), limits(None, 256)).is_err());
        assert!(fuse_sources(&beside(&[SCALE, &subgroup]), limits(Some(8), 256)).is_ok());
        assert!(fuse_sources(&beside(&[SCALE, &subgroup]), limits(Some(64), 256)).is_err());
        let wide = SCALE.replace("@workgroup_size(4, 2)", "@workgroup_size(64)");
        let fused = fuse_sources(&beside(&[&wide, &subgroup]), limits(Some(8), 256)).unwrap();
        let virtual_subgroups: Vec<bool> =
            fused.parts.iter().map(|p| p.virtual_subgroups).collect();
        assert_eq!(virtual_subgroups, [false, true]);
    }

    #[test]
    fn a_chain_runs_its_stages_in_turn_with_shared_buffers_writable() {
        // SCALE writes y; SUM then updates it (read_write already) and a
        // second SCALE reads it back as its x (read-only: made writable).
        let parts = [
            PartSource {
                wgsl: SCALE,
                stage: 0,
                written_elsewhere: vec![],
            },
            PartSource {
                wgsl: SUM,
                stage: 1,
                written_elsewhere: vec![],
            },
            PartSource {
                wgsl: SCALE,
                stage: 2,
                written_elsewhere: vec![1],
            },
        ];
        let fused = fuse_sources(&parts, limits(None, 256)).unwrap();
        let w = &fused.wgsl;
        assert!(fused.chain);
        assert_eq!(fused.grids_offset, None);
        assert!(!w.contains("fused_grids"), "{w}");
        assert_eq!(block_bytes([8, 16, 8].into_iter(), true), fused.block_bytes);
        assert!(w.contains("var<storage, read> x_k0"), "{w}");
        assert!(w.contains("var<storage, read_write> x_k2"), "{w}");
        assert_eq!(w.matches("storageBarrier();").count(), 2, "{w}");
        // The 8-invocation parts run on the first 8 of the 32.
        assert_eq!(w.matches("if (l < 8u)").count(), 2, "{w}");
        assert!(w.contains("@workgroup_size(32)"), "{w}");
        // In a chain a part with barriers may sit beside smaller parts, as
        // long as it spans the whole workgroup.
        let barrier = SUM.replace("let i =", "workgroupBarrier();\n    let i =");
        let mut with_barrier = parts.clone();
        with_barrier[1].wgsl = &barrier;
        assert!(fuse_sources(&with_barrier, limits(None, 256)).is_ok());
        let narrow = barrier.replace("@workgroup_size(32)", "@workgroup_size(16)");
        let wide = SCALE.replace("@workgroup_size(4, 2)", "@workgroup_size(8, 4)");
        with_barrier[1].wgsl = &narrow;
        with_barrier[2].wgsl = &wide;
        assert!(fuse_sources(&with_barrier, limits(None, 256))
            .unwrap_err()
            .contains("one size"));
        // Stages out of order, and a binding that is not a storage buffer.
        let mut backwards = parts.clone();
        backwards[2].stage = 0;
        assert!(fuse_sources(&backwards, limits(None, 256)).is_err());
        let mut params = parts.clone();
        params[0].written_elsewhere = vec![0];
        assert!(fuse_sources(&params, limits(None, 256)).is_err());
    }

    #[test]
    fn renaming_skips_members_attributes_and_comments() {
        let names: HashMap<String, String> = [("n", "n_k1"), ("T", "T_k1")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .into();
        let code = "struct S {\n    n: array<T, n>,\n    m: T,\n}\n// n stays\nlet v = s.n + n;\n";
        assert_eq!(
            rename(code, &names),
            "struct S {\n    n: array<T_k1, n_k1>,\n    m: T_k1,\n}\n// n stays\nlet v = s.n + n_k1;\n"
        );
    }
}
