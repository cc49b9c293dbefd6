"""gmmrefine.reconstruct"""
