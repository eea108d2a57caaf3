"""Networks: encoders (ResNet), segmentation factories (smp, MONAI), ViT-3D."""
