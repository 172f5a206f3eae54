//! A human-readable report of the opened adapter: what `kiln info` prints.

use crate::device::Device;
use std::fmt;

/// Adapter facts that matter to Kiln's kernels.
pub struct DeviceReport<'a>(pub &'a Device);

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

impl fmt::Display for DeviceReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let info = d.adapter_info();
        let limits = d.limits();
        let features = d.features();
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "adapter:                 {}", info.name)?;
        writeln!(f, "backend:                 {:?}", info.backend)?;
        writeln!(
            f,
            "type:                    {:?}{}",
            info.device_type,
            if d.is_cpu() { " (CPU adapter)" } else { "" }
        )?;
        writeln!(
            f,
            "driver:                  {} {}",
            info.driver, info.driver_info
        )?;
        writeln!(
            f,
            "f16 in shaders:          {}",
            yes_no(features.contains(wgpu::Features::SHADER_F16))
        )?;
        let subgroups = features.contains(wgpu::Features::SUBGROUP);
        if subgroups {
            writeln!(
                f,
                "subgroups:               yes, size {}..{}",
                info.subgroup_min_size, info.subgroup_max_size
            )?;
        } else {
            writeln!(f, "subgroups:               no")?;
        }
        writeln!(
            f,
            "max storage binding:     {}",
            mib(limits.max_storage_buffer_binding_size)
        )?;
        writeln!(
            f,
            "max buffer size:         {}",
            mib(limits.max_buffer_size)
        )?;
        writeln!(
            f,
            "storage buffers / stage: {}",
            limits.max_storage_buffers_per_shader_stage
        )?;
        writeln!(
            f,
            "shared memory:           {} KiB",
            limits.max_compute_workgroup_storage_size / 1024
        )?;
        writeln!(
            f,
            "invocations / workgroup: {}",
            limits.max_compute_invocations_per_workgroup
        )?;
        writeln!(
            f,
            "workgroups / dimension:  {}",
            limits.max_compute_workgroups_per_dimension
        )?;
        writeln!(
            f,
            "timestamp profiling:     {}",
            yes_no(features.contains(wgpu::Features::TIMESTAMP_QUERY))
        )?;
        if d.kernels_for_cpu() != d.is_cpu() {
            let class = if d.kernels_for_cpu() { "CPU" } else { "GPU" };
            writeln!(
                f,
                "kernels:                 as for a {class} (KILN_KERNEL_CLASS)"
            )?;
        }
        let tuning = d.tuning();
        write!(f, "matmul tiling:           {}", tuning.matmul)?;
        if tuning.small_matmul != tuning.matmul {
            write!(f, "\nsmall products:          {}", tuning.small_matmul)?;
        }
        if tuning.operand_textures {
            write!(
                f,
                "\nmatmul operands:         through textures (large products)"
            )?;
        }
        if let Some(shapes) = d.shape_tuning() {
            let count = |n: usize| match n.is_power_of_two() {
                true => format!("2^{}", n.ilog2()),
                false => n.to_string(),
            };
            let range = match shapes.max_multiply_adds {
                usize::MAX => format!("from {}", count(shapes.min_multiply_adds)),
                max => format!("from {} to {}", count(shapes.min_multiply_adds), count(max)),
            };
            write!(
                f,
                "\ntiling by shape:         products {range} multiply-adds ({})",
                shapes.file.display()
            )?;
        }
        Ok(())
    }
}
