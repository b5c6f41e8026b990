"""Stands for your own training script: plain PyTorch and torchvision, no lrx.

Trains torchvision's resnet18 (10 classes, from scratch) on an image folder and saves its state_dict:

    python train_own.py --data images --size 64 --epochs 3 --out my_resnet18.pt

The preprocessing is the one lrx feeds a model (see README, "Compress your own model"): shorter side
resized to --size, centre crop, ImageNet mean and std. No augmentation, to keep it short.
"""
import argparse

import torch
import torchvision
from torch import nn
from torchvision import transforms

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="images")
parser.add_argument("--size", type=int, default=64)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--out", default="my_resnet18.pt")
args = parser.parse_args()

torch.manual_seed(0)
prep = transforms.Compose([transforms.Resize(args.size), transforms.CenterCrop(args.size), transforms.ToTensor(),
                           transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
train = torchvision.datasets.ImageFolder(f"{args.data}/train", prep)
val = torchvision.datasets.ImageFolder(f"{args.data}/val", prep)
train_loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, num_workers=2)
val_loader = torch.utils.data.DataLoader(val, batch_size=256, num_workers=2)

model = torchvision.models.resnet18(num_classes=len(train.classes))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for epoch in range(args.epochs):
    model.train()
    for images, labels in train_loader:
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(images).argmax(1) == labels).sum().item() for images, labels in val_loader)
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}, val acc@1 {100 * correct / len(val):.2f}%")

torch.save(model.state_dict(), args.out)
print(f"saved {args.out}")
