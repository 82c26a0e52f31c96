//! The experiment's chart (plotters, SVG): active hosts and the hosts' power over the
//! window, one line per scenario, against the trace's hours.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::charts::plot_err;

use super::report::Experiment;

type Pick = fn(&(f64, f64, f64)) -> f64;

/// Writes the chart to `path`.
pub fn draw(path: &Path, e: &Experiment) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let title = format!(
        "fastmig consolidation experiment: {} hosts, {} VMs, measured every second",
        e.hosts, e.vms
    );
    let root = root.titled(&title, ("sans-serif", 20)).map_err(plot_err)?;
    let panels: [(&str, Pick); 2] = [
        ("active hosts", |p| p.1),
        ("power of all hosts (W)", |p| p.2),
    ];
    // The trace's clock: wall seconds times the compression, in hours.
    let hours = |t: f64| t * e.compression / 3600.0;
    let xmax = hours(e.window_s).max(1e-9);
    for (area, (label, pick)) in root.split_evenly((2, 1)).iter().zip(panels) {
        let ymax = e
            .scenarios
            .iter()
            .flat_map(|s| s.series.iter().map(pick))
            .fold(1e-9, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(label, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("trace time (hours)")
            .draw()
            .map_err(plot_err)?;
        for (i, s) in e.scenarios.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.series.iter().map(|p| (hours(p.0), pick(p))),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        crate::charts::draw_legend(&mut chart, None)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}
