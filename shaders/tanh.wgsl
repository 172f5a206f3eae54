// tanh to within about 3e-7 relative on every backend, for `TanhT` (an alias
// the including source sets: f32, or vec4<f32> in the LSTM sequence kernels).
// WGSL's own tanh is only as accurate as sinh / cosh built from exp, which
// loses all relative accuracy near 0, is undefined past |x| = 88.7 (inf / inf
// = NaN where it is built that way), and GPU drivers may use approximate
// hardware instructions. So: below 0.55 the Taylor series to x^15 (truncated
// under 5e-8 relative there); above, 1 - 2 / (e^2|x| + 1), which cancels
// little and takes its accuracy from exp's; past 15 tanh is 1 in f32. Both
// are computed and one selected, so vectors need no branch.
fn kiln_tanh(x: TanhT) -> TanhT {
    let z = min(abs(x), TanhT(15.0));
    let z2 = z * z;
    let series = z * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0
        + z2 * (62.0 / 2835.0 + z2 * (-1382.0 / 155925.0 + z2 * (21844.0 / 6081075.0
        + z2 * (-929569.0 / 638512875.0))))))));
    let saturating = 1.0 - 2.0 / (exp(2.0 * z) + 1.0);
    let t = select(saturating, series, z < TanhT(0.55));
    return select(-t, t, x >= TanhT(0.0));
}
