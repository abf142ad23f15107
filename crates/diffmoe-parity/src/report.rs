//! The parity report: one row per case and group of outputs.

/// The outcome of a group.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Every output within tolerance (exact where it must be).
    Pass,
    /// The first output outside tolerance or not computed, and why.
    Fail(String),
}

/// One row of the report: a case and a group of outputs (or of exact checks).
#[derive(Debug, Clone, PartialEq)]
pub struct ParityRow {
    /// Case name.
    pub case: String,
    /// Output group (`train.out`, `grad`, `encode.act`, `fid.regular`, ...).
    pub group: String,
    /// Outputs (or checks) compared.
    pub tensors: usize,
    /// Largest absolute error.
    pub max_abs: f64,
    /// Largest error relative to the reference's largest magnitude.
    pub max_rel: f64,
    /// Largest error over its elementwise tolerance (at most 1 passes), for
    /// the checkers whose tolerance is elementwise.
    pub tolerance_used: Option<f64>,
    /// Outcome.
    pub status: Status,
}

impl ParityRow {
    /// A passing row with nothing compared yet.
    pub fn new(case: &str, group: &str) -> Self {
        Self {
            case: case.into(),
            group: group.into(),
            tensors: 0,
            max_abs: 0.0,
            max_rel: 0.0,
            tolerance_used: None,
            status: Status::Pass,
        }
    }

    /// Records a failure; the first one stays, so a row names its first failing output.
    pub fn fail(&mut self, why: impl FnOnce() -> String) {
        if self.status == Status::Pass {
            self.status = Status::Fail(why());
        }
    }

    /// Folds one output's errors into the row.
    pub fn record(&mut self, max_abs: f64, max_rel: f64) {
        self.max_abs = self.max_abs.max(max_abs);
        self.max_rel = self.max_rel.max(max_rel);
    }

    /// A row of exact checks: each `(item, ok)` counts once, the first
    /// failing item names the failure.
    pub fn checks(case: &str, group: &str, items: impl IntoIterator<Item = (String, bool)>) -> Self {
        let mut row = Self::new(case, group);
        for (item, ok) in items {
            row.tensors += 1;
            if !ok {
                row.fail(|| item);
            }
        }
        row
    }
}

/// The report as a table, columns as wide as their longest entry.
pub fn format_report(rows: &[ParityRow]) -> String {
    let width = |header: &str, f: &dyn Fn(&ParityRow) -> usize| rows.iter().map(f).fold(header.len(), usize::max);
    let case_w = width("case", &|r| r.case.len());
    let group_w = width("group", &|r| r.group.len());
    let tolerance_column = rows.iter().any(|r| r.tolerance_used.is_some());
    let tolerance = |cell: String| if tolerance_column { format!(" {cell:>9}") } else { String::new() };
    let mut out = format!(
        "{:<case_w$} {:<group_w$} {:>5} {:>10} {:>10}{}  {}\n",
        "case",
        "group",
        "n",
        "max abs",
        "max rel",
        tolerance("tol used".into()),
        "status"
    );
    for r in rows {
        let status = match &r.status {
            Status::Pass => "ok".to_string(),
            Status::Fail(why) => format!("FAIL {why}"),
        };
        let used = r.tolerance_used.map_or_else(|| "-".to_string(), |u| format!("{u:.3}"));
        out.push_str(&format!(
            "{:<case_w$} {:<group_w$} {:>5} {:>10.3e} {:>10.3e}{}  {}\n",
            r.case,
            r.group,
            r.tensors,
            r.max_abs,
            r.max_rel,
            tolerance(used),
            status
        ));
    }
    out
}

/// Whether any row failed.
pub fn any_failed(rows: &[ParityRow]) -> bool {
    rows.iter().any(|r| matches!(r.status, Status::Fail(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_names_the_row() {
        let row = ParityRow::checks("c", "g", [("a".into(), true), ("b".into(), false), ("c".into(), false)]);
        assert_eq!(row.tensors, 3);
        assert_eq!(row.status, Status::Fail("b".into()));
        assert!(any_failed(&[ParityRow::new("c", "ok"), row]));
        assert!(!any_failed(&[ParityRow::new("c", "ok")]));
    }

    #[test]
    fn columns_fit_the_longest_entry_and_the_tolerance_column_only_when_used() {
        let mut long = ParityRow::new("a_rather_long_case_name", "g");
        long.record(1.5e-6, 2.0e-7);
        long.record(1.0e-6, 3.0e-7);
        assert_eq!((long.max_abs, long.max_rel), (1.5e-6, 3.0e-7));
        let mut failed = ParityRow::new("b", "group.with.dots");
        failed.fail(|| "`x` is not computed".into());
        let table = format_report(&[long.clone(), failed]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(!lines[0].contains("tol used"));
        assert!(lines[1].starts_with("a_rather_long_case_name g "));
        assert!(lines[1].ends_with("  ok"));
        assert!(lines[2].starts_with("b                       group.with.dots "));
        assert!(lines[2].ends_with("FAIL `x` is not computed"));
        // The columns line up: every line puts the status at the same place.
        let at = |l: &str, s: &str| l.rfind(s).expect("status present");
        assert_eq!(at(lines[0], "  status"), at(lines[1], "  ok"));

        long.tolerance_used = Some(0.25);
        let table = format_report(&[long, ParityRow::new("c", "g")]);
        assert!(table.lines().next().unwrap().contains("tol used"));
        assert!(table.contains("    0.250  ok"));
        assert!(table.lines().nth(2).unwrap().contains("        -  ok"));
    }
}
