//! `virtkube crd`: prints the CRDs, or writes one file per CRD (the chart's `crds/`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Arguments of `virtkube crd`.
#[derive(clap::Args, Debug)]
pub struct CrdArgs {
    /// Write one `<plural>.<group>.yaml` file per CRD into this directory instead of printing.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
}

/// Prints every CRD as a multi-document YAML stream, or writes them to `--output-dir`.
pub fn run(args: &CrdArgs) -> anyhow::Result<ExitCode> {
    match &args.output_dir {
        None => print!("{}", virtkube_crds::crd::all_yaml()?),
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in virtkube_crds::crd::all() {
                let path = dir.join(virtkube_crds::crd::file_name(&crd));
                std::fs::write(&path, virtkube_crds::crd::to_yaml(&crd)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
