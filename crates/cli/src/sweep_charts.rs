//! Charts of a sweep: total time, downtime, bytes, source and destination CPU and rounds
//! against memory size, guest write rate and link bandwidth; one colour per transport.

use std::path::Path;

use anyhow::Result;
use fastmig_model::Transport;
use plotters::prelude::*;

use crate::charts::plot_err;

use crate::sweep_row::SweepRow;

type Metric = (&'static str, fn(&SweepRow) -> f64);

const METRICS: [Metric; 6] = [
    ("total time (ms)", |r| r.total_ms),
    ("downtime (ms)", |r| r.downtime_ms),
    ("bytes sent (MiB)", |r| r.bytes_sent as f64 / 1048576.0),
    ("source CPU (s)", |r| r.src_cpu_s),
    ("destination CPU (s)", |r| r.dst_cpu_s),
    ("rounds", |r| r.rounds as f64),
];

type Axis = (&'static str, &'static str, fn(&SweepRow) -> Option<f64>);

const AXES: [Axis; 3] = [
    ("mem", "guest memory (MiB)", |r| {
        Some(r.mem_bytes as f64 / 1048576.0)
    }),
    ("rate", "guest writes (pages/s)", |r| {
        Some(r.guest_write_pps)
    }),
    ("link", "link (MiB/s; unlimited runs omitted)", |r| {
        r.link_bytes_s.map(|l| l / 1048576.0)
    }),
];

/// Writes `chart-mem.svg`, `chart-rate.svg` and `chart-link.svg` into `out`.
pub fn draw(out: &Path, rows: &[SweepRow]) -> Result<()> {
    for (name, label, x_of) in AXES {
        let path = out.join(format!("chart-{name}.svg"));
        let root = SVGBackend::new(&path, (1500, 900)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root
            .titled(
                &format!("fastmig sweep: cost against {label}"),
                ("sans-serif", 20),
            )
            .map_err(plot_err)?;
        for (panel, (mlabel, m)) in root.split_evenly((2, 3)).iter().zip(METRICS) {
            let pts: Vec<(Transport, f64, f64)> = rows
                .iter()
                .filter_map(|r| x_of(r).map(|x| (r.transport, x, m(r))))
                .collect();
            let xmax = pts.iter().map(|p| p.1).fold(1e-9, f64::max) * 1.05;
            let ymax = pts.iter().map(|p| p.2).fold(1e-9, f64::max) * 1.1;
            let mut chart = ChartBuilder::on(panel)
                .caption(mlabel, ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(55)
                .build_cartesian_2d(0.0..xmax, 0.0..ymax)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc(label)
                .draw()
                .map_err(plot_err)?;
            for (i, t) in Transport::ALL.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                let mine: Vec<(f64, f64)> = pts
                    .iter()
                    .filter(|p| p.0 == *t)
                    .map(|p| (p.1, p.2))
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                chart
                    .draw_series(
                        mine.iter()
                            .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                    )
                    .map_err(plot_err)?
                    .label(t.name())
                    .legend(move |(x, y)| Circle::new((x, y), 4, color.filled()));
            }
            crate::charts::draw_legend(&mut chart, None)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(())
}
