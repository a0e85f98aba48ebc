"""The report stage: results -> points with intervals (`points`, `stats`), the frontier figure
and tables (`frontier`), the seeds' claims (`claims`)."""
