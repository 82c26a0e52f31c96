//! SVG charts for benchmark results (plotters, SVG backend: no fonts or system libraries needed).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// Three bar panels, one per row (total time, downtime, CPU seconds per GiB), one bar per
/// transport.
pub fn migration_chart(
    path: &Path,
    mem: &str,
    workload: &str,
    medians: &BTreeMap<String, BTreeMap<String, f64>>,
) -> Result<()> {
    // One panel per row, so that every transport's name fits under its bar.
    let root = SVGBackend::new(path, (1000, 960)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let title = format!("fastmig migration, {mem} VM, {workload} (medians)");
    let root = root.titled(&title, ("sans-serif", 20)).map_err(plot_err)?;
    let panels = root.split_evenly((3, 1));
    let metrics = [
        ("total_ms", "total time (ms)"),
        ("downtime_ms", "downtime (ms)"),
        ("cpu_s_per_gib", "CPU s per GiB (src+dst)"),
    ];
    let names: Vec<&String> = medians.keys().collect();
    for (panel, (field, label)) in panels.iter().zip(metrics) {
        let values: Vec<f64> = names
            .iter()
            .map(|n| medians[*n].get(field).copied().unwrap_or(0.0))
            .collect();
        bar_panel(panel, label, &names, &values)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One bar chart on `area`: a bar per name.
pub fn bar_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    label: &str,
    names: &[&String],
    values: &[f64],
) -> Result<()> {
    let max = values.iter().copied().fold(0.0_f64, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(label, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d((0..names.len()).into_segmented(), 0.0..max)
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_style(("sans-serif", 14))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).map(|s| s.to_string()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            let color = Palette99::pick(i).filled();
            Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                color,
            )
        }))
        .map_err(|e| anyhow!("chart: {e}"))?;
    Ok(())
}

/// A plotters error as ours.
pub fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("chart: {e}")
}

/// The legend every chart here has: the series' labels on a light box with a black border,
/// where plotters puts it unless `at` says otherwise.
pub fn draw_legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    at: Option<SeriesLabelPosition>,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    let mut legend = chart.configure_series_labels();
    legend.background_style(WHITE.mix(0.8)).border_style(BLACK);
    if let Some(at) = at {
        legend.position(at);
    }
    legend.draw().map_err(plot_err)
}
