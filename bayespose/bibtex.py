"""
@article{Xu2026,
title = "Bayesian perspective for orientation determination in cryo-EM with application to structural heterogeneity analysis",
author = "Xu, Sheng and Balanov, Amnon and Singer, Amit and Bendory, Tamir",
journal = "Acta Crystallographica Section D",
volume = "82",
number = "4",
year = "2026",
url = "https://journals.iucr.org/d/issues/2026/04/00/bar5003/",
eprint = "arXiv:2412.03723",
doi = "https://doi.org/10.48550/arXiv.2412.03723",
note = "MMSE orientation estimator, priors on SO(3), EM with rotational-prior estimation; preprint arXiv:2412.03723"
}

@article{Lian2022,
title = "End-to-end orientation estimation from 2D cryo-EM images",
author = "Lian, Ruyi and Huang, Bingyao and Wang, Liguo and Liu, Qun and Lin, Yuewei and Ling, Haibin",
journal = "Acta Crystallographica Section D",
volume = "78",
pages = "174--186",
year = "2022",
doi = "https://doi.org/10.1107/S2059798321011761"
}

@article{SanchezGarcia2023,
title = "CESPED: a new benchmark for supervised particle pose estimation in Cryo-EM",
author = "Sanchez-Garcia, Ruben and Saur, Michael and Vargas, Javier and Poelking, Carl and Deane, Charlotte M.",
journal = "arXiv preprint arXiv:2311.06194",
year = "2023",
doi = "https://doi.org/10.48550/arXiv.2311.06194"
}

@misc{Chheda2024,
title = "CryoSphere: SO(3)-equivariant method for cryo-EM pose estimation",
author = "Chheda, Dev and Nori, Divya",
journal = "poster (Massachusetts Institute of Technology)",
year = "2024",
note = "poster; no DOI or preprint"
}

@inproceedings{Klee2023,
title = "Image to Sphere: Learning Equivariant Features for Efficient Pose Prediction",
author = "Klee, David M. and Biza, Ondrej and Platt, Robert and Walters, Robin",
booktitle = "International Conference on Learning Representations (ICLR)",
year = "2023",
doi = "https://doi.org/10.48550/arXiv.2302.13926",
url = "https://openreview.net/forum?id=_2bDpAtr7PI"
}

@article{Punjani2017,
title = "cryoSPARC: algorithms for rapid unsupervised cryo-EM structure determination",
author = "Punjani, Ali and Rubinstein, John L. and Fleet, David J. and Brubaker, Marcus A.",
journal = "Nature Methods",
volume = "14",
pages = "290--296",
year = "2017",
doi = "https://doi.org/10.1038/nmeth.4169"
}

@article{Scheres2012a,
title = "RELION: Implementation of a Bayesian approach to cryo-EM structure determination",
author = "Scheres, Sjors H. W.",
journal = "J. Struct. Biol.",
volume = "180",
pages = "519--530",
year = "2012",
doi = "https://doi.org/10.1016/j.jsb.2012.09.006"
}
"""
