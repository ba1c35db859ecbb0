//! `import-dataset KIND SRC OUT`: a public data set, as distributed, to an ImageNet-style folder.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use tools::import::{import, Cifar100Labels, DatasetKind, ImportOptions, TestSplit};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Labels {
    Fine,
    Coarse,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ForTest {
    Test,
    Val,
}

/// Reads a data set in its distributed form from SRC and writes OUT/train/<class>/...,
/// OUT/val/<class>/... (class folders that sort in label order, e.g. 000_airplane) and
/// OUT/LOC_synset_mapping.txt (class names, where the data set has them), which
/// `shard-imagenet OUT DST` shards unchanged.
///
/// cifar10, cifar100: the binary (cifar-10-batches-bin, cifar-100-binary) or Python
/// (cifar-10-batches-py, cifar-100-python) version, SRC being that folder or the one holding it;
/// images written as 32 x 32 PNGs, train batches to train/, the test batch to val/.
/// inat2019: SRC holds train2019.json, val2019.json and the images they name; the JPEGs are
/// hard-linked (copied across file systems). flowers102: SRC holds jpg/, imagelabels.mat,
/// setid.mat. stanford-cars: SRC holds cars_train/, cars_test/ and devkit/ (or car_ims/ and
/// cars_annos.mat).
#[derive(Parser, Debug)]
#[command(name = "import-dataset", version)]
struct Args {
    /// cifar10, cifar100, flowers102, stanford-cars or inat2019.
    kind: String,
    /// The extracted data set.
    src: PathBuf,
    /// Output directory (must not already hold train/ or val/).
    out: PathBuf,
    /// CIFAR-100: the 100 fine classes or the 20 superclasses.
    #[arg(long, value_enum, default_value = "fine")]
    cifar100_labels: Labels,
    /// Flowers-102: `test` writes trnid to train/, valid to val/, tstid to test/; `val` writes
    /// trnid + valid to train/ and tstid to val/ (the usual transfer protocol).
    #[arg(long, value_enum, default_value = "test")]
    split_for_test: ForTest,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let run = || -> anyhow::Result<()> {
        let kind = DatasetKind::parse(&a.kind)?;
        let opts = ImportOptions {
            cifar100_labels: match a.cifar100_labels {
                Labels::Fine => Cifar100Labels::Fine,
                Labels::Coarse => Cifar100Labels::Coarse,
            },
            test_split: match a.split_for_test {
                ForTest::Test => TestSplit::Test,
                ForTest::Val => TestSplit::Val,
            },
            quiet: a.quiet,
        };
        let s = import(kind, &a.src, &a.out, &opts)?;
        for n in &s.notes {
            println!("{n}");
        }
        let (mut files, mut bytes) = (0, 0);
        for sp in &s.splits {
            println!(
                "{}: {} images in {} classes, {:.1} MB",
                sp.name,
                sp.num_files(),
                sp.num_per_class.iter().filter(|&&n| n > 0).count(),
                sp.bytes as f64 / 1e6
            );
            files += sp.num_files();
            bytes += sp.bytes;
        }
        println!(
            "{}: {files} files ({} hard-linked) in {} classes, {:.1} MB in {:.1} s",
            a.out.display(),
            s.num_linked,
            s.classes.len(),
            bytes as f64 / 1e6,
            s.seconds
        );
        Ok(())
    };
    tools::bench::exit_on_error("import-dataset", run())
}
