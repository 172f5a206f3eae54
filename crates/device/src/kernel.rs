//! Compiled compute kernels and the cache that keeps them.
//!
//! A kernel is identified by a key made of the shader's name and its
//! specialisation (tile sizes, transposes, the expression of an elementwise op...).
//! Specialisation is done by generating WGSL text: [`Specialize`] prepends `const`
//! declarations, and `{{NAME}}` placeholders are replaced, so the driver's compiler
//! sees plain constants and can unroll and fold freely.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

/// A compute pipeline plus the layout of its bind group 0.
///
/// Binding convention for every Kiln kernel: binding 0 is a uniform block of
/// parameters, bindings 1.. are storage buffers in the order passed to
/// [`crate::Device::dispatch`]. Where the adapter allows, the parameter block
/// is passed as immediate data instead (see `binding.rs`).
#[derive(Clone)]
pub struct Kernel {
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) layout: wgpu::BindGroupLayout,
    /// Size of the parameter block when it is passed as immediate data.
    pub(crate) immediate_bytes: Option<u32>,
    pub(crate) key: String,
    /// The WGSL it was built from (before the parameter block moved to
    /// immediate data), for horizontal fusion.
    pub(crate) source: Arc<str>,
    /// The storage bindings it writes.
    pub(crate) writable: Arc<[u32]>,
    /// Size of its parameter block (none: it takes no parameters).
    pub(crate) param_bytes: Option<u32>,
    /// Buffers and textures it binds, at 1..=this.
    pub(crate) resources: u32,
}

impl Kernel {
    /// The cache key: the shader's name and its specialisation.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// Builds the WGSL source of a specialised kernel.
///
/// ```
/// use kiln_device::Specialize;
/// let src = Specialize::new("x = {{EXPR}};")
///     .constant_u32("TILE", 8)
///     .constant_bool("TRANS", false)
///     .replace("EXPR", "a + b")
///     .build();
/// assert!(src.contains("const TILE: u32 = 8u;"));
/// assert!(src.contains("x = a + b;"));
/// ```
pub struct Specialize {
    body: String,
    prelude: String,
}

impl Specialize {
    /// Starts from a WGSL body with `{{NAME}}` placeholders.
    pub fn new(body: &str) -> Self {
        Self {
            body: body.to_string(),
            prelude: String::new(),
        }
    }

    /// Declares `const name: u32 = value;` before the body.
    pub fn constant_u32(mut self, name: &str, value: u32) -> Self {
        let _ = writeln!(self.prelude, "const {name}: u32 = {value}u;");
        self
    }

    /// Declares `const name: bool = value;` before the body.
    pub fn constant_bool(mut self, name: &str, value: bool) -> Self {
        let _ = writeln!(self.prelude, "const {name}: bool = {value};");
        self
    }

    /// A constant of any WGSL type, given as WGSL text.
    pub fn constant(mut self, name: &str, ty: &str, value: &str) -> Self {
        let _ = writeln!(self.prelude, "const {name}: {ty} = {value};");
        self
    }

    /// Declares `const name: f32 = value;` before the body.
    pub fn constant_f32(mut self, name: &str, value: f32) -> Self {
        let _ = writeln!(self.prelude, "const {name}: f32 = {value:?};");
        self
    }

    /// A type alias (`alias name = ty;`), for code written once over types.
    pub fn alias(mut self, name: &str, ty: &str) -> Self {
        let _ = writeln!(self.prelude, "alias {name} = {ty};");
        self
    }

    /// Replaces every `{{name}}` in the body.
    pub fn replace(mut self, name: &str, text: &str) -> Self {
        self.body = self.body.replace(&format!("{{{{{name}}}}}"), text);
        self
    }

    /// The finished WGSL: `enable` directives first, then the declared constants
    /// and aliases, then the body.
    pub fn build(self) -> String {
        debug_assert!(
            !self.body.contains("{{"),
            "unreplaced placeholder in shader"
        );
        // WGSL wants `enable` directives before any declaration, so they move
        // above the generated constants.
        let (directives, body): (Vec<&str>, Vec<&str>) = self
            .body
            .lines()
            .partition(|l| l.trim_start().starts_with("enable "));
        format!(
            "{}\n{}\n{}",
            directives.join("\n"),
            self.prelude,
            body.join("\n")
        )
    }
}

/// Compiled kernels by key. Bounded: there is no way to ask the GPU how much
/// memory pipelines take, so the cache drops unused entries past a fixed count.
pub(crate) struct KernelCache {
    kernels: HashMap<String, Arc<Kernel>>,
    pub max_entries: usize,
}

impl KernelCache {
    pub fn new(max_entries: usize) -> Self {
        Self {
            kernels: HashMap::new(),
            max_entries,
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Kernel>> {
        self.kernels.get(key).cloned()
    }

    pub fn insert(&mut self, kernel: Arc<Kernel>) {
        if self.kernels.len() >= self.max_entries {
            self.kernels.retain(|_, k| Arc::strong_count(k) > 1);
        }
        self.kernels.insert(kernel.key.clone(), kernel);
    }

    pub fn len(&self) -> usize {
        self.kernels.len()
    }
}
