//! Choosing an adapter.
//!
//! Kiln prefers a real GPU (discrete, then integrated, then virtual) and falls back
//! to a CPU implementation (Mesa lavapipe through Vulkan, then llvmpipe through GL)
//! with one line on stderr saying so. `KILN_DEVICE` overrides the choice:
//!
//! | value        | meaning                                                     |
//! |--------------|-------------------------------------------------------------|
//! | `auto`       | best GPU, else a CPU adapter (the default)                   |
//! | `gpu`        | a GPU only; an error if there is none                        |
//! | `cpu`        | a CPU adapter only (CI has no GPU, so `auto` picks one there) |
//! | `X:FILTER`   | as `X`, restricted to a backend (`vulkan`, `gl`, `metal`, `dx12`) or to adapters whose name contains FILTER |
//! | `X:N`        | as `X`, the adapter at index N (from 0) of those it accepts, best first: on a machine with several identical GPUs, `gpu:1` is the second |
//!
//! `WGPU_BACKEND` (e.g. `gl`, `vulkan`) restricts the backends tried, as in wgpu.

use crate::error::{DeviceError, Result};
use std::fmt;
use std::str::FromStr;

/// Which kind of adapter to accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// The best GPU, falling back to a CPU adapter.
    #[default]
    Auto,
    /// A hardware (or virtual) GPU only.
    Gpu,
    /// A software (CPU) adapter only.
    Cpu,
}

/// A parsed device request, e.g. from `KILN_DEVICE=cpu:gl`.
///
/// ```
/// use kiln_device::{DeviceKind, DeviceSelector};
/// let s: DeviceSelector = "cpu:vulkan".parse().unwrap();
/// assert_eq!(s.kind, DeviceKind::Cpu);
/// assert_eq!(s.filter.as_deref(), Some("vulkan"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceSelector {
    /// Which kind of adapter to accept (`auto`, `gpu` or `cpu`).
    pub kind: DeviceKind,
    /// A backend name, a case-insensitive part of the adapter name, or an
    /// index among the adapters `kind` accepts.
    pub filter: Option<String>,
}

impl DeviceSelector {
    /// Reads `KILN_DEVICE`; unset or empty means `auto`.
    pub fn from_env() -> Result<Self> {
        match std::env::var("KILN_DEVICE") {
            Ok(v) if !v.trim().is_empty() => v.parse(),
            _ => Ok(Self::default()),
        }
    }

    /// The index the filter gives (`gpu:1`), if it is a number.
    pub fn filter_index(&self) -> Option<usize> {
        self.filter.as_deref()?.parse().ok()
    }

    /// The backend the filter names, if it names one.
    pub fn filter_backend(&self) -> Option<wgpu::Backends> {
        let f = self.filter.as_deref()?;
        let backends = match f.to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            _ => return None,
        };
        Some(backends)
    }

    /// The adapter this selector opens (as [`crate::Device::with_selector`]
    /// would), without opening it.
    pub fn resolve(&self) -> Result<wgpu::AdapterInfo> {
        Ok(choose(self)?.adapter.get_info())
    }

    fn accepts(&self, info: &wgpu::AdapterInfo) -> bool {
        let kind_ok = match self.kind {
            DeviceKind::Auto => true,
            DeviceKind::Gpu => !is_cpu(info),
            DeviceKind::Cpu => is_cpu(info),
        };
        let filter_ok = match (&self.filter, self.filter_backend()) {
            // An index picks among the accepted adapters later.
            (None, _) => true,
            (Some(_), _) if self.filter_index().is_some() => true,
            (Some(_), Some(backends)) => backends.contains(info.backend.into()),
            (Some(name), None) => info
                .name
                .to_ascii_lowercase()
                .contains(&name.to_ascii_lowercase()),
        };
        kind_ok && filter_ok
    }
}

impl FromStr for DeviceSelector {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self> {
        let (kind, filter) = match s.split_once(':') {
            Some((k, f)) => (k.trim(), Some(f.trim())),
            None => (s.trim(), None),
        };
        let kind = match kind.to_ascii_lowercase().as_str() {
            "" | "auto" => DeviceKind::Auto,
            "gpu" => DeviceKind::Gpu,
            "cpu" => DeviceKind::Cpu,
            other => {
                return Err(DeviceError::BadSelector {
                    given: s.to_string(),
                    reason: format!("unknown kind {other:?}"),
                })
            }
        };
        let filter = match filter {
            Some("") => {
                return Err(DeviceError::BadSelector {
                    given: s.to_string(),
                    reason: "empty filter after ':'".into(),
                })
            }
            f => f.map(str::to_string),
        };
        Ok(Self { kind, filter })
    }
}

impl fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            DeviceKind::Auto => "auto",
            DeviceKind::Gpu => "gpu",
            DeviceKind::Cpu => "cpu",
        };
        match &self.filter {
            Some(filter) => write!(f, "{kind}:{filter}"),
            None => write!(f, "{kind}"),
        }
    }
}

/// True for software rasterisers (lavapipe, llvmpipe, SwiftShader, WARP).
pub fn is_cpu(info: &wgpu::AdapterInfo) -> bool {
    if info.device_type == wgpu::DeviceType::Cpu {
        return true;
    }
    let name = info.name.to_ascii_lowercase();
    ["llvmpipe", "lavapipe", "softpipe", "swiftshader"]
        .iter()
        .any(|n| name.contains(n))
}

/// Whether kernels are chosen as for a CPU adapter (tilings, reductions,
/// workgroup shapes): the adapter's own kind, unless `KILN_KERNEL_CLASS` is
/// `cpu` or `gpu`. Tests set `gpu` on lavapipe to run the code paths meant
/// for GPUs where there is none.
pub fn kernels_for_cpu(info: &wgpu::AdapterInfo) -> bool {
    kernel_class_override().unwrap_or_else(|| is_cpu(info))
}

/// `KILN_KERNEL_CLASS` as "kernels for a CPU adapter", if set.
pub(crate) fn kernel_class_override() -> Option<bool> {
    match std::env::var("KILN_KERNEL_CLASS").ok()?.as_str() {
        "cpu" => Some(true),
        "gpu" => Some(false),
        other => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!("kiln: ignoring KILN_KERNEL_CLASS={other:?} (expected cpu or gpu)")
            });
            None
        }
    }
}

/// Higher is better. GPUs beat CPU adapters; among CPU adapters Vulkan (lavapipe)
/// beats GL (llvmpipe) because it exposes more features and runs compute faster.
fn rank(info: &wgpu::AdapterInfo) -> u32 {
    let type_rank = if is_cpu(info) {
        0
    } else {
        match info.device_type {
            wgpu::DeviceType::DiscreteGpu => 40,
            wgpu::DeviceType::IntegratedGpu => 30,
            wgpu::DeviceType::VirtualGpu => 20,
            _ => 10,
        }
    };
    let backend_rank = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 1,
        _ => 0,
    };
    type_rank + backend_rank
}

/// Why an adapter cannot run Kiln, if it cannot.
fn unusable_reason(adapter: &wgpu::Adapter) -> Option<String> {
    let caps = adapter.get_downlevel_capabilities();
    if !caps.flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS) {
        return Some("no compute shaders".into());
    }
    let limits = adapter.limits();
    if limits.max_compute_invocations_per_workgroup < 256 {
        return Some(format!(
            "only {} invocations per workgroup (Kiln needs 256)",
            limits.max_compute_invocations_per_workgroup
        ));
    }
    if limits.max_storage_buffers_per_shader_stage < 8 {
        return Some(format!(
            "only {} storage buffers per shader stage (Kiln needs 8)",
            limits.max_storage_buffers_per_shader_stage
        ));
    }
    None
}

/// The adapter chosen for a selector, with a note when it is a CPU fallback.
pub(crate) struct Chosen {
    pub adapter: wgpu::Adapter,
    pub fallback_note: Option<String>,
}

/// Builds the wgpu instance Kiln uses: all backends, unless `WGPU_BACKEND` or the
/// selector's filter narrows them.
pub(crate) fn instance_for(selector: &DeviceSelector) -> (wgpu::Instance, wgpu::Backends) {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if let Some(backends) = selector.filter_backend() {
        desc.backends &= backends;
    }
    let backends = desc.backends;
    (wgpu::Instance::new(desc), backends)
}

/// An adapter as [`list_adapters`] reports it.
#[derive(Clone, Debug)]
pub struct ListedAdapter {
    /// What wgpu says of it.
    pub info: wgpu::AdapterInfo,
    /// Why Kiln cannot use it, if it cannot.
    pub unusable: Option<String>,
    /// For a usable adapter, the `KILN_DEVICE` value that opens exactly it
    /// (`gpu:0`, `cpu:1`): its index among the usable adapters of its kind.
    pub selector: Option<DeviceSelector>,
}

/// Lists every adapter wgpu sees (on the backends `WGPU_BACKEND` allows),
/// usable or not, best first, each usable one with the selector that opens
/// it.
pub fn list_adapters() -> Vec<ListedAdapter> {
    // Every backend, whatever KILN_DEVICE says: an index selector (`cpu:1`)
    // counts over all of them, as `choose` does for it.
    let (ranked, _) = ranked_adapters(&DeviceSelector::default());
    let mut adapters: Vec<_> = ranked
        .into_iter()
        .map(|(adapter, unusable)| ListedAdapter {
            info: adapter.get_info(),
            unusable,
            selector: None,
        })
        .collect();
    let (mut gpus, mut cpus) = (0usize, 0usize);
    for adapter in adapters.iter_mut().filter(|a| a.unusable.is_none()) {
        let (kind, count) = match is_cpu(&adapter.info) {
            true => (DeviceKind::Cpu, &mut cpus),
            false => (DeviceKind::Gpu, &mut gpus),
        };
        adapter.selector = Some(DeviceSelector {
            kind,
            filter: Some(count.to_string()),
        });
        *count += 1;
    }
    adapters
}

/// The adapters on the selector's backends, each with why Kiln cannot use
/// it (if it cannot), best first; equals (several identical GPUs) stay in
/// the order the drivers list them, which an index selector counts in. One
/// order for [`choose`] and [`list_adapters`], so that the selectors listed
/// open the adapters they are listed with.
fn ranked_adapters(
    selector: &DeviceSelector,
) -> (Vec<(wgpu::Adapter, Option<String>)>, wgpu::Backends) {
    let (instance, backends) = instance_for(selector);
    let mut adapters: Vec<_> = pollster::block_on(instance.enumerate_adapters(backends))
        .into_iter()
        .map(|a| {
            let reason = unusable_reason(&a);
            (a, reason)
        })
        .collect();
    adapters.sort_by_key(|(a, _)| std::cmp::Reverse(rank(&a.get_info())));
    (adapters, backends)
}

pub(crate) fn choose(selector: &DeviceSelector) -> Result<Chosen> {
    let (adapters, backends) = ranked_adapters(selector);
    let mut seen = Vec::new();
    let mut accepted = Vec::new();
    for (adapter, reason) in adapters {
        let info = adapter.get_info();
        seen.push(match &reason {
            Some(r) => format!("{} ({:?}): unusable, {r}", info.name, info.backend),
            None => format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type),
        });
        if reason.is_none() && selector.accepts(&info) {
            accepted.push(adapter);
        }
    }
    let matching = accepted.len();
    let Some(adapter) = accepted
        .into_iter()
        .nth(selector.filter_index().unwrap_or(0))
    else {
        return Err(DeviceError::NoAdapter(no_adapter_message(
            selector, backends, &seen, matching,
        )));
    };
    let info = adapter.get_info();
    let fallback_note = (selector.kind == DeviceKind::Auto && is_cpu(&info)).then(|| {
        format!(
            "kiln: no GPU found, running on the CPU adapter {} ({:?}); expect CPU speed. Set KILN_DEVICE to choose explicitly.",
            info.name, info.backend
        )
    });
    Ok(Chosen {
        adapter,
        fallback_note,
    })
}

fn no_adapter_message(
    selector: &DeviceSelector,
    backends: wgpu::Backends,
    seen: &[String],
    matching: usize,
) -> String {
    if let Some(index) = selector.filter_index().filter(|_| matching > 0) {
        // Adapters are there, only fewer than the index asks for.
        return format!(
            "no usable graphics adapter for KILN_DEVICE={selector}: it asks for adapter \
             {index} (counting from 0) of those its kind accepts, and {matching} do. \
             `kiln info --all` lists each with its selector."
        );
    }
    let mut msg = format!(
        "no usable graphics adapter for KILN_DEVICE={selector} (backends tried: {backends:?})."
    );
    if seen.is_empty() {
        msg.push_str(" No adapter was found at all.");
    } else {
        msg.push_str(" Adapters found: ");
        msg.push_str(&seen.join("; "));
        msg.push('.');
    }
    msg.push_str(
        " To run on the CPU, install a Vulkan driver: `sudo apt-get install -y mesa-vulkan-drivers libvulkan1` on Debian/Ubuntu (`dnf install mesa-vulkan-drivers` on Fedora).",
    );
    if std::env::var_os("WGPU_BACKEND").is_some() {
        msg.push_str(" WGPU_BACKEND is set and limits the backends tried; unset it to try all.");
    }
    if selector.kind != DeviceKind::Auto || selector.filter.is_some() {
        msg.push_str(" KILN_DEVICE narrows the choice; try KILN_DEVICE=auto.");
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_selectors() {
        assert_eq!(
            "auto".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::default()
        );
        let s: DeviceSelector = "GPU:NVIDIA".parse().unwrap();
        assert_eq!(s.kind, DeviceKind::Gpu);
        assert_eq!(s.filter.as_deref(), Some("NVIDIA"));
        assert_eq!(s.filter_backend(), None);
        let s: DeviceSelector = "cpu:gl".parse().unwrap();
        assert_eq!(s.filter_backend(), Some(wgpu::Backends::GL));
        assert_eq!(s.filter_index(), None);
        assert_eq!(s.to_string(), "cpu:gl");
        let s: DeviceSelector = "gpu:1".parse().unwrap();
        assert_eq!((s.filter_index(), s.filter_backend()), (Some(1), None));
        assert!("tpu".parse::<DeviceSelector>().is_err());
        assert!("cpu:".parse::<DeviceSelector>().is_err());
    }
}
