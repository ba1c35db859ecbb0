//! The one font of the plots, DejaVu Sans, embedded in the binary and handed to plotters'
//! `ab_glyph` text backend under the family name "sans-serif" (the name plotters' defaults use),
//! so that no system font, font-kit or fontconfig is needed at run time. The TTF and its licence
//! (Bitstream Vera; DejaVu changes public domain) are in `tools/assets/`.

use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::style::FontStyle;

/// DejaVu Sans 2.37 (Debian `fonts-dejavu-core`), unmodified.
static DEJAVU_SANS_TTF: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// The family name every text style of the plots uses.
pub(crate) const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters, once per process; later calls return the first
/// call's outcome.
pub(crate) fn register() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, DEJAVU_SANS_TTF).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "the embedded font tools/assets/DejaVuSans.ttf is not a valid TrueType font (rebuild tools)"
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_font_registers() {
        super::register().unwrap();
        super::register().unwrap();
    }
}
