//! The exact merge of two partial attention results.
//!
//! If rows `a` and `b` are softmax-weighted means over disjoint key sets
//! `A` and `B`, with `lse = ln sum exp(logit)` over their sets, then over
//! `A u B`: `lse = ln(exp(lse_a) + exp(lse_b))` and
//! `out = w_a out_a + w_b out_b` with `w_x = exp(lse_x - lse)`. Computed
//! around the larger of the two so nothing overflows; an empty side
//! (`lse = -inf`) leaves the other exactly as it was.

use pie_core::error::{PieError, Result};

/// Merges `(other_out, other_lse)` into `(out, lse)`: rows of `v_dim`
/// values, one lse per row. Errors if the lengths disagree.
pub fn merge_into(
    out: &mut [f32],
    lse: &mut [f32],
    other_out: &[f32],
    other_lse: &[f32],
) -> Result<()> {
    let rows = lse.len();
    if other_lse.len() != rows || other_out.len() != out.len() {
        return Err(PieError::config(format!(
            "partial results differ in size: out {} vs {}, lse {rows} vs {}",
            out.len(),
            other_out.len(),
            other_lse.len()
        )));
    }
    if rows == 0 {
        return if out.is_empty() {
            Ok(())
        } else {
            Err(PieError::config("out has values but lse has no rows"))
        };
    }
    if !out.len().is_multiple_of(rows) {
        return Err(PieError::config(format!(
            "out holds {} values, not a whole number of rows for {rows} lse values",
            out.len()
        )));
    }
    merge_rows(out, lse, other_out, other_lse, out.len() / rows);
    Ok(())
}

/// [`merge_into`] with sizes already checked.
pub(crate) fn merge_rows(out: &mut [f32], lse: &mut [f32], o2: &[f32], l2: &[f32], dv: usize) {
    for (r, (la, &lb)) in lse.iter_mut().zip(l2).enumerate() {
        let oa = &mut out[r * dv..(r + 1) * dv];
        let ob = &o2[r * dv..(r + 1) * dv];
        if lb == f32::NEG_INFINITY {
            continue;
        }
        if *la == f32::NEG_INFINITY {
            oa.copy_from_slice(ob);
            *la = lb;
            continue;
        }
        let m = la.max(lb);
        let wa = (*la - m).exp();
        let wb = (lb - m).exp();
        let sum = wa + wb;
        let (ca, cb) = (wa / sum, wb / sum);
        for (x, y) in oa.iter_mut().zip(ob) {
            *x = ca * *x + cb * y;
        }
        *la = m + sum.ln();
    }
}
