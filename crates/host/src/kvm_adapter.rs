//! The glue between the KVM VM (`fastmig-vmm`) and the migration engine (`fastmig-migration`):
//! [`KvmMigratable`] implements [`MigratableVm`] over a [`Vm`]. It lives here so that neither
//! of those two libraries depends on the other.

use std::sync::{Arc, Mutex};

use fastmig_migration::{DirtyBitmap, MemoryRegion, MigratableVm, RegionLayout, VmError, VmLayout};
use fastmig_vmm::{DirtyLogHandle, Vm, VmRunState, VmState};

/// Feature bits both ends must share: the VMM's state format version (a destination that
/// cannot decode the source's vCPU state must refuse in the handshake, not at the end).
pub fn vm_features() -> u64 {
    u64::from(fastmig_vmm::STATE_VERSION)
}

/// A [`Vm`] seen by the migration engine.
pub struct KvmMigratable {
    vm: Arc<Vm>,
    dirty: Mutex<Option<DirtyLogHandle>>,
}

impl KvmMigratable {
    /// Wraps a VM.
    pub fn new(vm: Arc<Vm>) -> Self {
        KvmMigratable {
            vm,
            dirty: Mutex::new(None),
        }
    }

    /// The wrapped VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }
}

fn vm_err(what: &str) -> impl FnOnce(fastmig_vmm::VmmError) -> VmError + '_ {
    move |e| VmError::with_source(what.to_string(), e)
}

impl MigratableVm for KvmMigratable {
    fn layout(&self) -> VmLayout {
        VmLayout {
            regions: self
                .vm
                .memory_regions()
                .iter()
                .map(|r| RegionLayout {
                    gpa: r.guest_addr,
                    size: r.size,
                })
                .collect(),
            vcpus: u32::from(self.vm.config().vcpus),
            features: vm_features(),
        }
    }

    fn memory(&self) -> Vec<MemoryRegion> {
        self.vm
            .memory_regions()
            .iter()
            .map(|r| MemoryRegion {
                gpa: r.guest_addr,
                size: r.size,
                host_addr: r.host_addr,
                fd: Some(r.fd),
                fd_offset: r.fd_offset,
            })
            .collect()
    }

    fn start_dirty_log(&self) -> Result<(), VmError> {
        let handle = self
            .vm
            .dirty_log()
            .map_err(vm_err("starting the dirty log"))?;
        *self.dirty.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    fn sync_dirty_log(&self) -> Result<DirtyBitmap, VmError> {
        let guard = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let handle = guard
            .as_ref()
            .ok_or_else(|| VmError::msg("dirty log sync before start"))?;
        let bitmap = handle.fetch().map_err(vm_err("syncing the dirty log"))?;
        let pages = (self.vm.config().mem_size / fastmig_vmm::PAGE_SIZE as u64) as usize;
        Ok(DirtyBitmap::from_words(bitmap.words, pages))
    }

    fn stop_dirty_log(&self) -> Result<(), VmError> {
        // Dropping the subscription unsubscribes; the VM's own rate monitor keeps its own.
        self.dirty.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }

    fn pause(&self) -> Result<(), VmError> {
        self.vm.pause().map_err(vm_err("pausing the vCPUs"))
    }

    fn resume(&self) -> Result<(), VmError> {
        // A destination VM has never run: its first resume starts the vCPU threads.
        match self.vm.status().state {
            VmRunState::Incoming | VmRunState::Created => {
                self.vm.start().map_err(vm_err("starting the vCPUs"))
            }
            _ => self.vm.resume().map_err(vm_err("resuming the vCPUs")),
        }
    }

    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        let state = self.vm.save_state().map_err(vm_err("saving vCPU state"))?;
        state.to_bytes().map_err(vm_err("encoding vCPU state"))
    }

    fn restore_state(&self, state: &[u8]) -> Result<(), VmError> {
        let state = VmState::from_bytes(state).map_err(vm_err("decoding vCPU state"))?;
        self.vm
            .restore_state(&state)
            .map_err(vm_err("restoring vCPU state"))
    }
}
