"""TotalSegmentator's companion tools on tsrt's runtime: contrast phase, modality, Evans index."""
