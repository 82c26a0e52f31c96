//! Data-centre configuration: host and VM types, and the CloudSim 3.0.3 reference setup
//! (`examples/power/Constants.java`, `PlanetLabConstants`).

use serde::{Deserialize, Serialize};

use crate::power::{SpecPowerModel, HP_ML110_G4, HP_ML110_G5};

/// A kind of physical host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostType {
    /// Display name.
    pub name: String,
    /// MIPS per processing element (core).
    pub pe_mips: f64,
    /// Number of processing elements.
    pub pes: u32,
    /// RAM in MB.
    pub ram_mb: u32,
    /// Network bandwidth in CloudSim units (1,000,000 = 1 Gbit/s).
    pub bw: u64,
    /// Storage in MB.
    pub storage_mb: u64,
    /// Power model.
    pub power: SpecPowerModel,
}

impl HostType {
    /// Total MIPS of the host.
    pub fn total_mips(&self) -> f64 {
        self.pe_mips * f64::from(self.pes)
    }
}

/// A kind of VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmType {
    /// MIPS of its single virtual PE.
    pub mips: f64,
    /// RAM in MB (drives migration time).
    pub ram_mb: u32,
    /// Bandwidth in CloudSim units (100,000 = 100 Mbit/s).
    pub bw: u64,
    /// Image size in MB.
    pub size_mb: u64,
}

/// Hosts and VMs of one simulation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatacenterSpec {
    /// Host kinds.
    pub host_types: Vec<HostType>,
    /// Kind of each host, in host-id order.
    pub hosts: Vec<usize>,
    /// VM kinds.
    pub vm_types: Vec<VmType>,
    /// Per VM: (kind, trace row).
    pub vms: Vec<(usize, usize)>,
}

/// CloudSim's reference host count for the PlanetLab experiments.
pub const REFERENCE_HOSTS: usize = 800;

/// The two HP ProLiant host types of the reference setup (G4 first, as CloudSim numbers them).
pub fn reference_host_types() -> Vec<HostType> {
    vec![
        HostType {
            name: "HP ProLiant ML110 G4".into(),
            pe_mips: 1860.0,
            pes: 2,
            ram_mb: 4096,
            bw: 1_000_000,
            storage_mb: 1_000_000,
            power: SpecPowerModel::new(HP_ML110_G4),
        },
        HostType {
            name: "HP ProLiant ML110 G5".into(),
            pe_mips: 2660.0,
            pes: 2,
            ram_mb: 4096,
            bw: 1_000_000,
            storage_mb: 1_000_000,
            power: SpecPowerModel::new(HP_ML110_G5),
        },
    ]
}

/// The four VM types of the reference setup (2500/2000/1000/500 MIPS; 870/1740/1740/613 MB).
pub fn reference_vm_types() -> Vec<VmType> {
    [(2500.0, 870), (2000.0, 1740), (1000.0, 1740), (500.0, 613)]
        .into_iter()
        .map(|(mips, ram_mb)| VmType {
            mips,
            ram_mb,
            bw: 100_000,
            size_mb: 2500,
        })
        .collect()
}

impl DatacenterSpec {
    /// The CloudSim reference setup for `vm_count` traces: 800 hosts alternating G4/G5, VM types
    /// assigned in four contiguous blocks of `ceil(n / 4)`, VM i running trace i.
    pub fn reference(vm_count: usize) -> Self {
        Self::scaled(REFERENCE_HOSTS, vm_count, vm_count)
    }

    /// A scaled version of the reference setup: `hosts` hosts alternating G4/G5 and `vms` VMs,
    /// VM i replaying trace `i mod traces`, types in four contiguous blocks.
    pub fn scaled(hosts: usize, vms: usize, traces: usize) -> Self {
        let block = vms.div_ceil(4).max(1);
        Self {
            host_types: reference_host_types(),
            hosts: (0..hosts).map(|i| i % 2).collect(),
            vm_types: reference_vm_types(),
            vms: (0..vms)
                .map(|i| ((i / block).min(3), i % traces.max(1)))
                .collect(),
        }
    }
}
