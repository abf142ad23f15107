//! `diffmoe info`: parameter counts of a preset or config file.

use std::fmt::Write;

use diffmoe_model::{ParamReport, RunConfig};

/// Formats the totals and per-module breakdown of a configuration.
pub fn report(run: &RunConfig, per_layer: bool) -> String {
    let m = &run.model;
    let r = ParamReport::from_config(m);
    let mut out = String::new();
    let _ = writeln!(out, "{}  ({})", run.name, run.description);
    let moe = match &m.moe {
        Some(moe) => format!(
            ", {} experts ({:?} layout), capacity {}, {} MoE blocks",
            moe.num_experts,
            moe.layout,
            moe.capacity,
            m.moe_blocks().len()
        ),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "family {}, objective {:?}, D {}, depth {}, heads {}, patch {}, {}x{}x{} input ({} tokens){moe}",
        m.family.paper_name(),
        run.objective,
        m.hidden_size,
        m.depth,
        m.num_heads,
        m.patch_size,
        m.input_size,
        m.input_size,
        m.in_channels,
        m.tokens()
    );
    let _ = writeln!(out, "total parameters:      {:>15}", group(r.total));
    let _ = writeln!(out, "activated per token:   {:>15}", group(r.activated.round() as usize));
    if per_layer {
        let _ = writeln!(out, "\n{:<28} {:<52} {:>15} {:>15}", "module", "kind", "total", "activated");
        for row in &r.rows {
            let _ = writeln!(
                out,
                "{:<28} {:<52} {:>15} {:>15}",
                row.name,
                row.kind,
                group(row.total),
                group(row.activated.round() as usize)
            );
        }
    }
    out
}

/// `1981962464` -> `1,981,962,464`.
fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(group(1_981_962_464), "1,981,962,464");
        assert_eq!(group(816), "816");
    }

    #[test]
    fn report_shows_official_totals() {
        let run = diffmoe_model::preset("diffmoe-l-e16-flow").unwrap();
        assert!(report(&run, true).contains("1,981,962,464"));
    }
}
