//! Bind groups: each kernel's layout, read from its WGSL, and a bounded cache of
//! the bind groups built on those layouts.
//!
//! A training step dispatches the same kernels on the same pooled buffers every
//! step; only the parameters change, and they travel as immediates (or, on
//! adapters without them, at a dynamic offset into the parameter arena). So a
//! bind group is keyed by layout and buffers and built once. Building one costs more than it seems: validation and tracking
//! in wgpu, and on lavapipe a descriptor pool mapped and unmapped each time,
//! which made up a third of the recording thread's time in an MLP step.

use std::collections::HashMap;
use wgpu::naga;

/// How every Kiln kernel declares its parameter block.
pub(crate) const PARAM_DECLARATION: &str = "@group(0) @binding(0) var<uniform> p: Params;";
/// The same block passed as immediate data (push constants).
const IMMEDIATE_DECLARATION: &str = "var<immediate> p: Params;";

/// A kernel's WGSL and bind group layout, with its parameter block passed as
/// immediate data where the adapter allows it (see [`KernelLayout::read`]).
pub(crate) struct KernelLayout {
    pub source: String,
    pub entries: Vec<wgpu::BindGroupLayoutEntry>,
    /// Bytes of immediate data holding the parameters; `None` when they are
    /// the uniform buffer at binding 0, bound at a dynamic offset.
    pub immediate_bytes: Option<u32>,
    /// The storage bindings the kernel writes.
    pub writable: Vec<u32>,
    /// Size of the parameter block, if the kernel has one.
    pub param_bytes: Option<u32>,
    /// Bindings after the parameter block (numbered 1..=this).
    pub resources: u32,
}

impl KernelLayout {
    /// Reads the bindings of a Kiln kernel: binding 0 is the uniform parameter
    /// block, every other binding a storage buffer, read-only unless the shader
    /// writes it. Parameters of up to `max_immediate_bytes` move to immediate
    /// data, so the bind group holds storage buffers only and can be reused.
    pub fn read(source: String, max_immediate_bytes: u32) -> Result<Self, String> {
        let module =
            naga::front::wgsl::parse_str(&source).map_err(|e| e.emit_to_string(&source))?;
        let mut entries = Vec::new();
        let mut param_bytes = None;
        for (_, global) in module.global_variables.iter() {
            let Some(binding) = &global.binding else {
                continue;
            };
            if binding.group != 0 {
                return Err(format!(
                    "binding {} is in group {}; Kiln kernels use group 0 only",
                    binding.binding, binding.group
                ));
            }
            if let naga::TypeInner::Image {
                dim: naga::ImageDimension::D2,
                arrayed: false,
                class:
                    naga::ImageClass::Sampled {
                        kind: naga::ScalarKind::Float,
                        multi: false,
                    },
            } = module.types[global.ty].inner
            {
                // A texture operand (see `Device::texture_operand`): read
                // with textureLoad only, so unfilterable.
                entries.push(wgpu::BindGroupLayoutEntry {
                    binding: binding.binding,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Texture {
                        sample_type: wgpu::TextureSampleType::Float { filterable: false },
                        view_dimension: wgpu::TextureViewDimension::D2,
                        multisampled: false,
                    },
                    count: None,
                });
                continue;
            }
            let ty = match global.space {
                naga::AddressSpace::Uniform if binding.binding == 0 => {
                    param_bytes = Some(module.types[global.ty].inner.size(module.to_ctx()));
                    wgpu::BufferBindingType::Uniform
                }
                naga::AddressSpace::Storage { access } => wgpu::BufferBindingType::Storage {
                    read_only: !access.contains(naga::StorageAccess::STORE),
                },
                space => {
                    return Err(format!(
                        "binding {}: {space:?} is not a Kiln binding (uniform parameters \
                         at 0, storage buffers after)",
                        binding.binding
                    ))
                }
            };
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: binding.binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty,
                    has_dynamic_offset: binding.binding == 0,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        entries.sort_by_key(|e| e.binding);
        // Dispatches bind their buffers at 1, 2, ... in order, so a gap (or a
        // buffer at 0, where the parameters go) could never be filled.
        let resources: Vec<u32> = entries
            .iter()
            .map(|e| e.binding)
            .filter(|&b| b != 0 || param_bytes.is_none())
            .collect();
        if let Some(i) = (0..resources.len()).find(|&i| resources[i] != i as u32 + 1) {
            return Err(format!(
                "binding {} where binding {} was expected: Kiln kernels take their \
                 parameters at 0 and their buffers at 1, 2, ... without gaps",
                resources[i],
                i + 1
            ));
        }
        let writable = entries
            .iter()
            .filter(|e| {
                matches!(
                    e.ty,
                    wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: false },
                        ..
                    }
                )
            })
            .map(|e| e.binding)
            .collect();
        let immediate_bytes =
            param_bytes.filter(|&b| b <= max_immediate_bytes && source.contains(PARAM_DECLARATION));
        let source = match immediate_bytes {
            Some(_) => {
                entries.retain(|e| e.binding != 0);
                source.replacen(PARAM_DECLARATION, IMMEDIATE_DECLARATION, 1)
            }
            None => source,
        };
        Ok(Self {
            source,
            entries,
            immediate_bytes,
            writable,
            param_bytes,
            resources: resources.len() as u32,
        })
    }
}

/// What a kernel binds at 1..: storage buffers, and textures where an
/// operand is read through one.
#[derive(Clone, Copy)]
pub(crate) enum Bound<'a> {
    Buffer(&'a wgpu::Buffer),
    Texture(&'a wgpu::TextureView),
}

#[derive(PartialEq, Eq, Hash)]
enum BoundKey {
    Buffer(wgpu::Buffer),
    Texture(wgpu::TextureView),
}

#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    layout: wgpu::BindGroupLayout,
    resources: Vec<BoundKey>,
}

/// Bind groups by layout and storage buffers. Bounded: past `max_entries` it
/// starts over. Entries hold their buffers, so the pool tells it which buffers
/// it lets go of ([`BindGroupCache::forget`]) and their memory is freed.
pub(crate) struct BindGroupCache {
    groups: HashMap<BindKey, wgpu::BindGroup>,
    max_entries: usize,
    /// Bind groups built so far.
    created: u64,
}

impl BindGroupCache {
    pub fn new(max_entries: usize) -> Self {
        Self {
            groups: HashMap::new(),
            max_entries,
            created: 0,
        }
    }

    /// Bind groups built so far.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// The bind group of `layout` with `buffers` at bindings 1.. and, unless
    /// the kernel takes its parameters as immediate data, the parameter arena
    /// (one block of `param_bytes` at a dynamic offset) at binding 0.
    pub fn get_or_create(
        &mut self,
        device: &wgpu::Device,
        layout: &wgpu::BindGroupLayout,
        params: Option<(&wgpu::Buffer, u64)>,
        resources: &[Bound],
    ) -> wgpu::BindGroup {
        let key = BindKey {
            layout: layout.clone(),
            resources: resources
                .iter()
                .map(|r| match *r {
                    Bound::Buffer(b) => BoundKey::Buffer(b.clone()),
                    Bound::Texture(t) => BoundKey::Texture(t.clone()),
                })
                .collect(),
        };
        if let Some(group) = self.groups.get(&key) {
            return group.clone();
        }
        let mut entries = Vec::with_capacity(resources.len() + 1);
        if let Some((buffer, bytes)) = params {
            entries.push(wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: 0,
                    size: wgpu::BufferSize::new(bytes),
                }),
            });
        }
        for (i, r) in resources.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: match *r {
                    Bound::Buffer(b) => b.as_entire_binding(),
                    Bound::Texture(t) => wgpu::BindingResource::TextureView(t),
                },
            });
        }
        self.created += 1;
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout,
            entries: &entries,
        });
        if self.groups.len() >= self.max_entries {
            self.groups.clear();
        }
        self.groups.insert(key, group.clone());
        group
    }

    /// Drops the bind groups that hold `buffer`.
    pub fn forget(&mut self, buffer: &wgpu::Buffer) {
        self.groups.retain(|key, _| {
            !key.resources
                .iter()
                .any(|r| matches!(r, BoundKey::Buffer(b) if b == buffer))
        });
    }

    /// Drops the bind groups that hold a texture.
    pub fn forget_textures(&mut self) {
        self.groups.retain(|key, _| {
            !key.resources
                .iter()
                .any(|r| matches!(r, BoundKey::Texture(_)))
        });
    }

    pub fn clear(&mut self) {
        self.groups.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KERNEL: &str = "struct Params { n: u32, scale: f32 }\n\
                          @group(0) @binding(0) var<uniform> p: Params;\n\
                          @group(0) @binding(2) var<storage, read_write> out: array<f32>;\n\
                          @group(0) @binding(1) var<storage, read> x: array<f32>;\n\
                          @compute @workgroup_size(1) fn main() { out[0] = x[p.n] * p.scale; }";

    fn kinds(layout: &KernelLayout) -> Vec<(u32, wgpu::BufferBindingType, bool)> {
        layout
            .entries
            .iter()
            .map(|e| match e.ty {
                wgpu::BindingType::Buffer {
                    ty,
                    has_dynamic_offset,
                    ..
                } => (e.binding, ty, has_dynamic_offset),
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn layouts_follow_the_declared_access() {
        let layout = KernelLayout::read(KERNEL.into(), 0).unwrap();
        assert_eq!(layout.immediate_bytes, None);
        assert_eq!(layout.source, KERNEL);
        assert_eq!(
            kinds(&layout),
            vec![
                (0, wgpu::BufferBindingType::Uniform, true),
                (
                    1,
                    wgpu::BufferBindingType::Storage { read_only: true },
                    false
                ),
                (
                    2,
                    wgpu::BufferBindingType::Storage { read_only: false },
                    false
                ),
            ]
        );
    }

    #[test]
    fn parameters_move_to_immediates_when_they_fit() {
        let layout = KernelLayout::read(KERNEL.into(), 8).unwrap();
        assert_eq!(layout.immediate_bytes, Some(8));
        assert!(layout.source.contains("var<immediate> p: Params;"));
        assert!(!layout.source.contains("var<uniform>"));
        assert_eq!(kinds(&layout).len(), 2);
        // Too large a block stays a uniform buffer.
        let layout = KernelLayout::read(KERNEL.into(), 4).unwrap();
        assert_eq!(layout.immediate_bytes, None);
        assert_eq!(kinds(&layout).len(), 3);
    }

    #[test]
    fn layouts_take_float_textures_and_reject_what_kiln_cannot_bind() {
        let textured = "@group(0) @binding(1) var t: texture_2d<f32>;\n\
                        @compute @workgroup_size(1) fn main() {}";
        let layout = KernelLayout::read(textured.into(), 0).unwrap();
        assert!(matches!(
            layout.entries[0].ty,
            wgpu::BindingType::Texture {
                sample_type: wgpu::TextureSampleType::Float { filterable: false },
                ..
            }
        ));
        let integer = textured.replace("texture_2d<f32>", "texture_2d<u32>");
        let err = KernelLayout::read(integer, 0).err().unwrap();
        assert!(err.contains("binding 1"), "{err}");
        assert!(KernelLayout::read("fn main( {".into(), 0).is_err());
    }

    #[test]
    fn layouts_count_their_buffers_and_refuse_gaps_or_a_buffer_at_0() {
        let layout = KernelLayout::read(KERNEL.into(), 0).unwrap();
        assert_eq!((layout.param_bytes, layout.resources), (Some(8), 2));
        let gap = KERNEL.replace("@binding(2)", "@binding(3)");
        let err = KernelLayout::read(gap, 0).err().unwrap();
        assert!(err.contains("binding 3 where binding 2"), "{err}");
        let at_zero = "@group(0) @binding(0) var<storage, read_write> out: array<f32>;\n\
                       @compute @workgroup_size(1) fn main() { out[0] = 1.0; }";
        let err = KernelLayout::read(at_zero.into(), 0).err().unwrap();
        assert!(err.contains("binding 0 where binding 1"), "{err}");
        let no_params = at_zero.replace("@binding(0)", "@binding(1)");
        let layout = KernelLayout::read(no_params, 0).unwrap();
        assert_eq!((layout.param_bytes, layout.resources), (None, 1));
    }
}
