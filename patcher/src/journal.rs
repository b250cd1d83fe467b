//! Every write lpvmm makes to guest memory outside the patch area's contents goes
//! through here, with the bytes it replaced, so that it can be undone exactly.

use crate::GuestWriter;
use serde::{Deserialize, Serialize};

use crate::KpError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    /// Guest-physical address.
    pub pa: u64,
    pub before: Vec<u8>,
    pub after: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub writes: Vec<Write>,
}

impl Journal {
    /// Write `data` at `pa`, remembering what was there.
    pub fn write(
        &mut self,
        guest: &mut dyn GuestWriter,
        pa: u64,
        data: &[u8],
    ) -> Result<(), KpError> {
        let mut before = vec![0u8; data.len()];
        guest
            .read_phys(pa, &mut before)
            .map_err(|e| KpError::Guest(format!("reading {pa:#x}: {e}")))?;
        guest
            .write_phys(pa, data)
            .map_err(|e| KpError::Guest(format!("writing {pa:#x}: {e}")))?;
        self.writes.push(Write {
            pa,
            before,
            after: data.to_vec(),
        });
        Ok(())
    }

    /// Undo every write, newest first.
    pub fn undo(&mut self, guest: &mut dyn GuestWriter) -> Result<(), KpError> {
        while let Some(w) = self.writes.pop() {
            guest
                .write_phys(w.pa, &w.before)
                .map_err(|e| KpError::Guest(format!("restoring {:#x}: {e}", w.pa)))?;
        }
        Ok(())
    }
}
