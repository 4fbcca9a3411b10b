"""What a run leaves behind besides the label map: per-class files, statistics, preview, DICOM, radiomics."""
