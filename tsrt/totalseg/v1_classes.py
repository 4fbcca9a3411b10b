"""TotalSegmentator v1's label numbers of the `total` task, for `--v1_order` (map_to_binary.class_map["total_v1"]).

v1 numbered 104 classes 1..104 in this order; `--v1_order` renumbers a v2 `total` map to it so
pipelines written for v1 keep working. tests/test_totalseg_parity.py checks it against the
installed TotalSegmentator.
"""

from __future__ import annotations

from types import MappingProxyType

_NAMES = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left",
    "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right",
    "vertebrae_L5", "vertebrae_L4", "vertebrae_L3", "vertebrae_L2", "vertebrae_L1", "vertebrae_T12", "vertebrae_T11",
    "vertebrae_T10", "vertebrae_T9", "vertebrae_T8", "vertebrae_T7", "vertebrae_T6", "vertebrae_T5", "vertebrae_T4",
    "vertebrae_T3", "vertebrae_T2", "vertebrae_T1", "vertebrae_C7", "vertebrae_C6", "vertebrae_C5", "vertebrae_C4",
    "vertebrae_C3", "vertebrae_C2", "vertebrae_C1", "esophagus", "trachea", "heart_myocardium", "heart_atrium_left",
    "heart_ventricle_left", "heart_atrium_right", "heart_ventricle_right", "pulmonary_artery", "brain",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "small_bowel", "duodenum",
    "colon", *(f"rib_left_{i}" for i in range(1, 13)), *(f"rib_right_{i}" for i in range(1, 13)),
    "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left", "clavicula_right",
    "femur_left", "femur_right", "hip_left", "hip_right", "sacrum", "face", "gluteus_maximus_left",
    "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left",
    "gluteus_minimus_right", "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right",
    "urinary_bladder",
)

#: label number -> class name, as TotalSegmentator 1.x wrote `total`.
TOTAL_V1_CLASSES = MappingProxyType({index: name for index, name in enumerate(_NAMES, start=1)})
