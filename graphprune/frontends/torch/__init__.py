"""The PyTorch frontend: ``nn.Module`` + example inputs → IR via ``torch.export``, and back
(a smaller ``GraphModule``, or the user's module class with smaller layers)."""
