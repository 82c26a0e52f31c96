-- Version 2: samples can be pruned by interval (`--keep-intervals`): index them by interval.
CREATE INDEX host_samples_by_interval ON host_samples (interval_no);
CREATE INDEX vm_samples_by_interval ON vm_samples (interval_no);
