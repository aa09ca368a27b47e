//! `smg` binary: the m3serve gateway.
fn main() {
    println!("smg gateway (wire format v{})", smg_core::WIRE_FORMAT_VERSION);
}
