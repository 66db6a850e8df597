"""OA metrics on label maps: overlap, surface distances, volumes and agreement, cartilage
thickness. Plain NumPy arrays and spacing in mm in, numbers and maps out; nothing here knows
about models. Definitions and empty-mask rules: docs/metrics.md."""

from __future__ import annotations

from imask_jax.metrics.detection import ClassAP, MaskAP, image_average_precision, mask_iou
from imask_jax.metrics.overlap import (KNEE_LABELS, CaseStatus, OverlapMetrics, Summary,
                                       case_status, overlap_metrics, overlap_per_label,
                                       summarize, summarize_values)
from imask_jax.metrics.slicewise import (SLICE_VALUES, SliceMetrics, slice_metrics,
                                         slice_metrics_per_label)
from imask_jax.metrics.surface import (SurfaceMetrics, average_hausdorff,
                                       directed_surface_distances,
                                       hausdorff_voxels, surface_metrics,
                                       surface_metrics_per_label, surface_voxels)
from imask_jax.metrics.thickness import (Cylinder, InterfaceThickness, KneeLabelValues,
                                         PlateComparison, ThicknessDifference, ThicknessMap,
                                         compare_thickness, cylinder_coordinates,
                                         femoral_angle_bin_deg, femoral_thickness_map, fit_cylinder,
                                         interface_thickness, thickness_difference,
                                         tibial_thickness_map)
from imask_jax.metrics.thickness import THICKNESS_METHODS, ThicknessCoverage, default_smoothing_mm  # noqa: F401, E501
from imask_jax.metrics.volume import (BlandAltman, CoefficientOfVariation, HipAgreement,
                                      HipVolumeTable, IntraclassCorrelation, MeanSD,
                                      PairAgreement, PairedDifference, ScanVolumes,
                                      baseline_scans, bland_altman, coefficient_of_variation,
                                      hip_volume_table, intraclass_correlation,
                                      paired_difference, pairwise_agreement,
                                      effusion_ml_by_side, volume_ml, volumes_ml_per_label)

__all__ = [
    'ClassAP', 'MaskAP', 'image_average_precision', 'mask_iou',
    'KNEE_LABELS', 'CaseStatus', 'OverlapMetrics', 'Summary', 'case_status', 'overlap_metrics',
    'overlap_per_label', 'summarize', 'summarize_values',
    'SLICE_VALUES', 'SliceMetrics', 'slice_metrics', 'slice_metrics_per_label',
    'SurfaceMetrics', 'average_hausdorff', 'directed_surface_distances', 'hausdorff_voxels',
    'surface_metrics', 'surface_metrics_per_label', 'surface_voxels',
    'Cylinder', 'InterfaceThickness', 'KneeLabelValues', 'PlateComparison',
    'ThicknessDifference', 'ThicknessMap', 'compare_thickness', 'cylinder_coordinates',
    'femoral_angle_bin_deg', 'femoral_thickness_map', 'fit_cylinder', 'interface_thickness',
    'thickness_difference', 'tibial_thickness_map',
    'BlandAltman', 'CoefficientOfVariation', 'HipAgreement', 'HipVolumeTable',
    'IntraclassCorrelation', 'MeanSD', 'PairAgreement', 'PairedDifference', 'ScanVolumes',
    'baseline_scans', 'bland_altman', 'coefficient_of_variation', 'hip_volume_table',
    'intraclass_correlation', 'paired_difference', 'pairwise_agreement', 'effusion_ml_by_side',
    'volume_ml', 'volumes_ml_per_label',
]
