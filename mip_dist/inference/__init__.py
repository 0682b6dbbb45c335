"""Using a trained model: features for images (`FeatureExtractor`), feature files (`feature_file`), gallery
search (`search`) and ONNX export (`onnx_export`)."""
