"""gmmrefine.hetero"""
