"""gmmrefine.gmm"""
