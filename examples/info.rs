//! Prints the adapter Kiln picks and the limits that matter to its kernels.
//!
//! ```text
//! cargo run --release --example info
//! KILN_DEVICE=cpu:gl cargo run --release --example info
//! ```

fn main() -> anyhow::Result<()> {
    let device = kiln::Device::new()?;
    println!("{}", kiln::device::DeviceReport(&device));
    Ok(())
}
