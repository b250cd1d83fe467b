//! AFL++ target `control`: see [`lpvmm_fuzz::control`].
fn main() {
    afl::fuzz!(|data: &[u8]| lpvmm_fuzz::control(data));
}
